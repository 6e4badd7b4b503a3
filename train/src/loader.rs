//! nanochat's BOS best-fit packing loader (docs/reference.md §8) and the validation bits-per-byte metric.
//!
//! Every document is tokenized with `<|bos|>` in front. Rows of T+1 tokens are filled from a
//! buffer of up to 1000 documents: take the largest buffered document that fits whole in what is
//! left of the row; when none fits, crop the shortest one to fill the row exactly (the rest of
//! it is dropped). inputs = row[:-1], targets = row[1:].
//!
//! Documents are numbered in stream order (the stream cycles over the files, epoch after
//! epoch); the loader state is the number of the next unread document plus the numbers of the
//! buffered ones, so a restored loader rebuilds exactly the same buffer and yields exactly the
//! batches an uninterrupted one would.
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use femtochat_engine::{Ids, Reduction, no_grad};
use femtochat_model::Gpt;
use femtochat_model::tokenizer::Tokenizer;

use crate::docs;
use crate::trainer::{Batch, BatchSource, Validator};

/// Documents held for best-fit packing.
pub const BUFFER_DOCS: usize = 1000;
/// Documents tokenized per parallel batch.
const TOKENIZE_BATCH: usize = 128;

type DocStream = Box<dyn Iterator<Item = Result<String>> + Send>;

pub struct BestFitLoader {
    files: Vec<PathBuf>,
    tok: Arc<Tokenizer>,
    b: usize,
    t: usize,
    /// Cycle over the files forever (training) or stop at their end (validation).
    cycle: bool,
    stream: DocStream,
    /// Number of the next document the stream yields.
    next_doc: u64,
    /// (document number, tokens with BOS), in arrival order.
    buffer: Vec<(u64, Vec<u32>)>,
    exhausted: bool,
    /// Skip records that cannot be documents instead of stopping (`--skip-bad`).
    skip_bad: bool,
    /// Records skipped so far in this pass over the stream.
    skipped: u64,
}

fn stream(files: &[PathBuf], cycle: bool) -> DocStream {
    if cycle {
        let files = files.to_vec();
        Box::new(std::iter::repeat_with(move || docs::documents(&files)).flatten())
    } else {
        Box::new(docs::documents(files))
    }
}

impl BestFitLoader {
    pub fn new(
        files: Vec<PathBuf>,
        tok: Arc<Tokenizer>,
        b: usize,
        t: usize,
        cycle: bool,
    ) -> Result<Self> {
        if files.is_empty() {
            bail!("no data files");
        }
        // A cycling stream over files without a single document would spin forever.
        if docs::documents(&files).next().transpose()?.is_none() {
            bail!("the data files hold no documents: {files:?}");
        }
        let stream = stream(&files, cycle);
        Ok(BestFitLoader {
            files,
            tok,
            b,
            t,
            cycle,
            stream,
            next_doc: 0,
            buffer: Vec::new(),
            exhausted: false,
            skip_bad: false,
            skipped: 0,
        })
    }

    /// Skip bad records (counted, the first few named on stderr) instead of failing on them.
    pub fn skip_bad(mut self, skip: bool) -> Self {
        self.skip_bad = skip;
        self
    }

    /// Read up to `n` documents; returns them numbered.
    fn read(&mut self, n: usize) -> Result<Vec<(u64, String)>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.stream.next() {
                Some(Err(e)) if self.skip_bad && e.is::<docs::BadRecord>() => {
                    // Skipped records take no document number, so a restore re-reading the
                    // stream numbers documents the same way.
                    self.skipped += 1;
                    if self.skipped <= 5 {
                        eprintln!("skipping bad record: {e}");
                    }
                }
                Some(doc) => {
                    out.push((self.next_doc, doc?));
                    self.next_doc += 1;
                }
                None => {
                    self.exhausted = true;
                    break;
                }
            }
        }
        Ok(out)
    }

    fn tokenize(&self, docs: Vec<(u64, String)>) -> Vec<(u64, Vec<u32>)> {
        let texts: Vec<&str> = docs.iter().map(|(_, d)| d.as_str()).collect();
        let bos = self.tok.bos();
        let ids = self.tok.encode_batch(&texts);
        docs.into_iter()
            .zip(ids)
            .map(|((n, _), ids)| {
                let mut v = Vec::with_capacity(ids.len() + 1);
                v.push(bos);
                v.extend(ids);
                (n, v)
            })
            .collect()
    }

    fn refill(&mut self) -> Result<()> {
        while self.buffer.len() < BUFFER_DOCS && !self.exhausted {
            let want = TOKENIZE_BATCH.min(BUFFER_DOCS - self.buffer.len());
            let docs = self.read(want)?;
            if docs.is_empty() {
                if self.next_doc == 0 {
                    bail!("the data files hold no documents: {:?}", self.files);
                }
                break;
            }
            let toks = self.tokenize(docs);
            self.buffer.extend(toks);
        }
        Ok(())
    }

    /// One packed row of T+1 tokens, or None when a non-cycling stream runs dry.
    fn next_row(&mut self) -> Result<Option<Vec<u32>>> {
        let len = self.t + 1;
        let mut row = Vec::with_capacity(len);
        while row.len() < len {
            self.refill()?;
            if self.buffer.is_empty() {
                return Ok(None);
            }
            let room = len - row.len();
            // Largest document that fits whole (first one on ties).
            let mut best: Option<usize> = None;
            for (i, (_, d)) in self.buffer.iter().enumerate() {
                if d.len() <= room && best.is_none_or(|b| d.len() > self.buffer[b].1.len()) {
                    best = Some(i);
                }
            }
            match best {
                Some(i) => row.extend(self.buffer.remove(i).1),
                None => {
                    // Nothing fits: crop the shortest document to fill the row.
                    let i = (0..self.buffer.len())
                        .min_by_key(|&i| self.buffer[i].1.len())
                        .context("buffer is not empty")?;
                    row.extend_from_slice(&self.buffer.remove(i).1[..room]);
                }
            }
        }
        Ok(Some(row))
    }

    /// The position of a loader that has yielded nothing yet (what `state_json` gives before
    /// the first batch): for runs whose weights came from elsewhere, e.g. a nanochat import.
    pub fn initial_state() -> serde_json::Value {
        serde_json::json!({ "next_doc": 0, "buffer": [], "skipped": 0 })
    }

    /// Loader position for checkpoints.
    pub fn state_json(&self) -> serde_json::Value {
        let buffered: Vec<u64> = self.buffer.iter().map(|(n, _)| *n).collect();
        serde_json::json!({ "next_doc": self.next_doc, "buffer": buffered, "skipped": self.skipped })
    }

    /// Rewind to a saved position: re-read the stream up to `next_doc`, keeping the buffered
    /// documents (the stream is deterministic, so they are the same documents).
    pub fn restore_json(&mut self, state: &serde_json::Value) -> Result<()> {
        let next_doc = state["next_doc"].as_u64().context("loader state has no `next_doc`")?;
        let keep: HashSet<u64> = state["buffer"]
            .as_array()
            .context("loader state has no `buffer`")?
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        self.stream = stream(&self.files, self.cycle);
        self.next_doc = 0;
        self.buffer.clear();
        self.exhausted = false;
        self.skipped = 0;
        while self.next_doc < next_doc {
            let want = (next_doc - self.next_doc).min(4096) as usize;
            let docs: Vec<(u64, String)> =
                self.read(want)?.into_iter().filter(|(n, _)| keep.contains(n)).collect();
            if self.exhausted && self.next_doc < next_doc {
                bail!("the data holds fewer documents than the checkpoint had read ({next_doc})");
            }
            let toks = self.tokenize(docs);
            self.buffer.extend(toks);
        }
        Ok(())
    }
}

impl BatchSource for BestFitLoader {
    fn next_batch(&mut self) -> Result<Batch> {
        let (mut inputs, mut targets) =
            (Vec::with_capacity(self.b * self.t), Vec::with_capacity(self.b * self.t));
        for _ in 0..self.b {
            let row = self.next_row()?.context("the training data ran out")?;
            inputs.extend_from_slice(&row[..self.t]);
            targets.extend(row[1..].iter().map(|&x| x as i32));
        }
        Ok(Batch { inputs, targets })
    }

    fn state(&self) -> serde_json::Value {
        self.state_json()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        self.restore_json(state)
    }
}

/// Fixed validation rows and the bits-per-byte metric over them.
pub struct ValSet {
    rows: Vec<Vec<u32>>,
    t: usize,
    batch: usize,
    /// UTF-8 byte length of every token id; 0 for special tokens.
    token_bytes: Vec<u32>,
}

impl ValSet {
    /// Pack up to `max_tokens` worth of rows from `files` (one pass, no cycling).
    pub fn new(
        files: Vec<PathBuf>,
        tok: Arc<Tokenizer>,
        t: usize,
        batch: usize,
        max_tokens: usize,
    ) -> Result<Self> {
        Self::new_skipping(files, tok, t, batch, max_tokens, false)
    }

    /// `new`, skipping records that are not documents when `skip_bad`.
    pub fn new_skipping(
        files: Vec<PathBuf>,
        tok: Arc<Tokenizer>,
        t: usize,
        batch: usize,
        max_tokens: usize,
        skip_bad: bool,
    ) -> Result<Self> {
        let token_bytes = tok.byte_lengths();
        let mut loader = BestFitLoader::new(files, tok, 1, t, false)?.skip_bad(skip_bad);
        let mut rows = Vec::new();
        while rows.len() * t < max_tokens.max(t) {
            match loader.next_row()? {
                Some(r) => rows.push(r),
                None => break,
            }
        }
        if rows.is_empty() {
            bail!("the validation data is too short for one row of {} tokens", t + 1);
        }
        Ok(ValSet { rows, t, batch: batch.max(1), token_bytes })
    }

    pub fn tokens(&self) -> usize {
        self.rows.len() * self.t
    }

    /// The rows of T + 1 tokens.
    pub fn rows(&self) -> &[Vec<u32>] {
        &self.rows
    }

    /// UTF-8 byte length of every token id (0 for specials).
    pub fn token_bytes(&self) -> &[u32] {
        &self.token_bytes
    }
}

/// bits per byte = sum of losses over targets with byte length > 0 / (ln 2 * their total bytes).
pub fn bits_per_byte(losses: &[f32], targets: &[u32], token_bytes: &[u32]) -> (f64, u64) {
    let (mut nats, mut bytes) = (0.0f64, 0u64);
    for (&l, &t) in losses.iter().zip(targets) {
        let b = token_bytes.get(t as usize).copied().unwrap_or(0);
        if b > 0 {
            nats += l as f64;
            bytes += b as u64;
        }
    }
    (nats, bytes)
}

impl Validator for ValSet {
    fn val_bpb(&mut self, gpt: &Gpt) -> Result<f64> {
        let _g = no_grad();
        let (mut nats, mut bytes) = (0.0f64, 0u64);
        for chunk in self.rows.chunks(self.batch) {
            let b = chunk.len();
            let inputs: Vec<u32> = chunk.iter().flat_map(|r| r[..self.t].iter().copied()).collect();
            let targets: Vec<u32> = chunk.iter().flat_map(|r| r[1..].iter().copied()).collect();
            let t32: Vec<i32> = targets.iter().map(|&x| x as i32).collect();
            let losses =
                gpt.loss(&Ids::new(inputs, &[b, self.t])?, &t32, Reduction::None)?.try_to_vec()?;
            let (n, by) = bits_per_byte(&losses, &targets, &self.token_bytes);
            nats += n;
            bytes += by;
        }
        if bytes == 0 {
            bail!("validation targets hold no text bytes");
        }
        Ok(nats / (std::f64::consts::LN_2 * bytes as f64))
    }
}

/// A loader running on its own thread, `depth` batches ahead of the model, so reading and
/// tokenizing documents overlap the forward/backward instead of stalling it.
///
/// Each batch travels with the loader state right after it was made, so `state()` describes the
/// batches *consumed*, not the ones prefetched: a resumed run still sees exactly the batches an
/// uninterrupted one would have.
pub struct Prefetch<L: BatchSource + Send + 'static = BestFitLoader> {
    rx: Option<Receiver<(Result<Batch>, serde_json::Value)>>,
    worker: Option<JoinHandle<L>>,
    state: serde_json::Value,
    depth: usize,
}

impl<L: BatchSource + Send + 'static> Prefetch<L> {
    pub fn new(loader: L, depth: usize) -> Result<Prefetch<L>> {
        let state = loader.state();
        let depth = depth.max(1);
        let (tx, rx) = sync_channel(depth);
        let worker = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || produce(loader, tx))
            .context("starting the data loader thread")?;
        Ok(Prefetch { rx: Some(rx), worker: Some(worker), state, depth })
    }

    /// Stop the worker (it notices the closed channel at its next send) and take the loader back.
    fn stop(&mut self) -> Result<L> {
        drop(self.rx.take());
        let worker = self.worker.take().context("the data loader thread is gone")?;
        worker.join().map_err(|_| anyhow::anyhow!("the data loader thread panicked"))
    }
}

fn produce<L: BatchSource>(mut loader: L, tx: SyncSender<(Result<Batch>, serde_json::Value)>) -> L {
    loop {
        let batch = loader.next_batch();
        let failed = batch.is_err();
        if tx.send((batch, loader.state())).is_err() || failed {
            return loader;
        }
    }
}

impl<L: BatchSource + Send + 'static> BatchSource for Prefetch<L> {
    fn next_batch(&mut self) -> Result<Batch> {
        let rx = self.rx.as_ref().context("the data loader was stopped")?;
        let (batch, state) = rx.recv().context("the data loader thread stopped")?;
        self.state = state;
        batch
    }

    fn state(&self) -> serde_json::Value {
        self.state.clone()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let mut loader = self.stop()?;
        loader.restore(state)?;
        *self = Prefetch::new(loader, self.depth)?;
        Ok(())
    }
}

impl<L: BatchSource + Send + 'static> Drop for Prefetch<L> {
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use femtochat_model::tokenizer::Tokenizer;

    fn tok() -> Arc<Tokenizer> {
        let docs = ["the cat sat on the mat", "a dog ran far away from home"];
        Arc::new(Tokenizer::train(&docs, 300).unwrap())
    }

    fn write_docs(dir: &std::path::Path, docs: &[String]) -> PathBuf {
        let p = dir.join("d.jsonl");
        let lines: String =
            docs.iter().map(|d| format!("{}\n", serde_json::json!({ "text": d }))).collect();
        std::fs::write(&p, lines).unwrap();
        p
    }

    /// Documents of distinct lengths made of one distinct byte each, so every token in a row
    /// tells which document it came from.
    fn docs(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                std::iter::repeat_n((b'a' + (i % 26) as u8) as char, 3 + (i * 7) % 23).collect()
            })
            .collect()
    }

    /// The prefetching loader yields the plain loader's batches, reports the state after the
    /// batches it handed out (not the ones it ran ahead to), and restores from it.
    #[test]
    fn prefetch_matches_plain_loader_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tok();
        let file = write_docs(dir.path(), &docs(80));
        let plain = || BestFitLoader::new(vec![file.clone()], tok.clone(), 3, 24, true).unwrap();
        let mut a = plain();
        let mut p = Prefetch::new(plain(), 4).unwrap();
        let mut saved = None;
        for i in 0..12 {
            assert_eq!(a.next_batch().unwrap(), p.next_batch().unwrap(), "batch {i}");
            assert_eq!(a.state(), p.state(), "state after batch {i}");
            if i == 5 {
                saved = Some(p.state());
            }
        }
        let want: Vec<Batch> = (0..5).map(|_| a.next_batch().unwrap()).collect();
        // Resume from the state after batch 5: batches 6.. again, then the same as `a`.
        let mut r = Prefetch::new(plain(), 2).unwrap();
        r.restore(saved.as_ref().unwrap()).unwrap();
        for _ in 6..12 {
            r.next_batch().unwrap();
        }
        let got: Vec<Batch> = (0..5).map(|_| r.next_batch().unwrap()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn rows_start_with_bos_and_only_crops_split_documents() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tok();
        // Numbered, so a cropped document never reads as another whole one; 21-27 tokens with
        // BOS, so a row of 33 holds one whole document and must crop the next.
        let all: Vec<String> =
            (0..60).map(|i| format!("{i:02}{}", "xyz".repeat(6 + (i * 7) % 3))).collect();
        let file = write_docs(dir.path(), &all);
        let mut l = BestFitLoader::new(vec![file], tok.clone(), 4, 32, true).unwrap();
        let bos = tok.bos();
        let (mut whole, mut cropped) = (0, 0);
        for _ in 0..10 {
            let b = l.next_batch().unwrap();
            for r in 0..4 {
                // The row of T + 1 tokens: inputs plus the last target.
                let mut row = b.inputs[r * 32..(r + 1) * 32].to_vec();
                row.push(b.targets[(r + 1) * 32 - 1] as u32);
                assert_eq!(row[0], bos, "every row starts with BOS");
                // Between BOS tokens, documents: every one but the last is a whole document of
                // the corpus; the last is a whole one or the start of one.
                let mut starts: Vec<usize> = (0..row.len()).filter(|&i| row[i] == bos).collect();
                starts.push(row.len());
                for (k, w) in starts.windows(2).enumerate() {
                    let text = tok.decode(&row[w[0] + 1..w[1]]).unwrap();
                    if all.contains(&text) {
                        whole += 1;
                    } else {
                        assert_eq!(k + 2, starts.len(), "only the row's last document is cropped");
                        assert!(all.iter().any(|d| d.starts_with(&text)), "a prefix: {text:?}");
                        cropped += 1;
                    }
                }
            }
            assert_eq!(
                &b.targets[..31],
                &b.inputs[1..32].iter().map(|&x| x as i32).collect::<Vec<_>>()[..]
            );
        }
        assert_eq!((whole, cropped), (40, 40), "one whole and one cropped document per row");
    }

    #[test]
    fn best_fit_takes_the_largest_fitting_document_then_crops_the_shortest() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tok();
        let file =
            write_docs(dir.path(), &["aaaa".into(), "bbbbbbbbbbbbbbbbbbbb".into(), "cc".into()]);
        let lens: Vec<usize> = ["aaaa", "bbbbbbbbbbbbbbbbbbbb", "cc"]
            .iter()
            .map(|d| tok.encode(d).len() + 1)
            .collect();
        let t = lens[1] + lens[0] - 1; // room for b and a whole, not c
        let mut l = BestFitLoader::new(vec![file], tok.clone(), 1, t, false).unwrap();
        let row = l.next_row().unwrap().unwrap();
        let mut want: Vec<u32> = vec![tok.bos()];
        want.extend(tok.encode("bbbbbbbbbbbbbbbbbbbb"));
        want.push(tok.bos());
        want.extend(tok.encode("aaaa"));
        // Row is T+1 long: b (largest fitting) then a, both whole, which fill it exactly.
        assert_eq!(row, want);
        // Next row: only c is left and the stream is over.
        assert!(l.next_row().unwrap().is_none() || l.buffer.is_empty());
    }

    #[test]
    fn restore_continues_with_identical_batches() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tok();
        let file = write_docs(dir.path(), &docs(2500));
        let mut a = BestFitLoader::new(vec![file.clone()], tok.clone(), 2, 64, true).unwrap();
        for _ in 0..30 {
            a.next_batch().unwrap();
        }
        let state = a.state_json();
        let mut b = BestFitLoader::new(vec![file], tok, 2, 64, true).unwrap();
        b.restore_json(&state).unwrap();
        for _ in 0..40 {
            assert_eq!(a.next_batch().unwrap(), b.next_batch().unwrap());
        }
    }

    #[test]
    fn bpb_ignores_zero_byte_targets() {
        let (nats, bytes) = bits_per_byte(&[1.0, 2.0, 3.0], &[0, 1, 2], &[2, 0, 3]);
        assert_eq!((nats, bytes), (4.0, 5));
    }

    #[test]
    fn empty_data_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("e.jsonl");
        std::fs::write(&file, "").unwrap();
        let err = BestFitLoader::new(vec![file], tok(), 1, 8, true).err().unwrap();
        assert!(err.to_string().contains("no documents"), "{err}");
    }
}
