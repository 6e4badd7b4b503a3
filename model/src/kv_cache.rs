//! Per-row KV caches for inference (docs/reference.md §5).
//!
//! Each row (one sequence) owns, per layer, k and v buffers (1, capacity, Hkv, D) holding keys
//! after rope + QK-norm + scale and values after the value embedding, its position, and the
//! previous token's post-norm embedding for smear. Rows are independent, so a scheduler can add
//! and drop rows between decode steps (continuous batching) while every row keeps its position.
use femtochat_engine::{Device, Tensor};

use crate::config::GPTConfig;
use crate::error::{ModelError, Result};

struct Row {
    pos: usize,
    k: Vec<Tensor>, // per layer (1, capacity, Hkv, D)
    v: Vec<Tensor>, // per layer (1, capacity, Hkv, D)
    prev: Vec<f32>, // (C) post-norm embedding of the last token; zeros before the first
}

pub struct KvCache {
    rows: Vec<Row>,
    capacity: usize,
    n_layer: usize,
    n_kv_head: usize,
    head_dim: usize,
    n_embd: usize,
}

impl KvCache {
    /// An empty cache (no rows) whose rows will hold up to `capacity` positions each.
    pub fn new(config: &GPTConfig, capacity: usize) -> KvCache {
        KvCache {
            rows: Vec::new(),
            capacity,
            n_layer: config.n_layer,
            n_kv_head: config.n_kv_head,
            head_dim: config.head_dim(),
            n_embd: config.n_embd,
        }
    }

    /// A cache with `rows` empty rows.
    pub fn with_rows(config: &GPTConfig, rows: usize, capacity: usize) -> KvCache {
        let mut c = KvCache::new(config, capacity);
        for _ in 0..rows {
            c.push_row();
        }
        c
    }

    /// Add an empty row at the end; returns its index.
    pub fn push_row(&mut self) -> usize {
        let shape = [1, self.capacity, self.n_kv_head, self.head_dim];
        self.rows.push(Row {
            pos: 0,
            k: (0..self.n_layer).map(|_| Tensor::zeros(&shape)).collect(),
            v: (0..self.n_layer).map(|_| Tensor::zeros(&shape)).collect(),
            prev: vec![0.0; self.n_embd],
        });
        self.rows.len() - 1
    }

    /// Move every row of `other` to the end of this cache (a prefilled request joins the batch).
    pub fn absorb(&mut self, other: KvCache) -> Result<()> {
        let dims = |c: &KvCache| (c.capacity, c.n_layer, c.n_kv_head, c.head_dim, c.n_embd);
        if dims(self) != dims(&other) {
            return Err(ModelError::Invalid(format!(
                "cannot merge KV caches of different shapes: {:?} and {:?}",
                dims(self),
                dims(&other)
            )));
        }
        self.rows.extend(other.rows);
        Ok(())
    }

    /// Remove row `r` and return it as a one-row cache; later rows shift down by one.
    pub fn take_row(&mut self, r: usize) -> Result<KvCache> {
        if r >= self.rows.len() {
            return Err(ModelError::Invalid(format!("no cache row {r} of {}", self.rows.len())));
        }
        let row = self.rows.remove(r);
        Ok(KvCache { rows: vec![row], ..*self })
    }

    /// A cache of `copies` rows that each continue row `r`: its keys and values (copied on their
    /// device, up to its position), position and last embedding. The n choices of one request
    /// share one prefill this way.
    pub fn fork_row(&self, r: usize, copies: usize) -> Result<KvCache> {
        let src = self.rows.get(r).ok_or_else(|| {
            ModelError::Invalid(format!("no cache row {r} of {}", self.rows.len()))
        })?;
        let copy = |t: &Tensor| -> Result<Tensor> {
            let c = Tensor::zeros(t.shape()).to_device(t.device())?;
            if src.pos > 0 {
                c.write_block(1, 0, &t.narrow(1, 0, src.pos)?)?;
            }
            Ok(c)
        };
        let mut rows = Vec::with_capacity(copies);
        for _ in 0..copies {
            rows.push(Row {
                pos: src.pos,
                k: src.k.iter().map(copy).collect::<Result<_>>()?,
                v: src.v.iter().map(copy).collect::<Result<_>>()?,
                prev: src.prev.clone(),
            });
        }
        Ok(KvCache { rows, ..*self })
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of tokens row `r` holds (the position of its next token).
    pub fn position(&self, r: usize) -> usize {
        self.rows[r].pos
    }

    /// Whether every row has room for `t` more tokens.
    pub(crate) fn check_room(&self, t: usize) -> Result<()> {
        match self.rows.iter().find(|row| row.pos + t > self.capacity) {
            Some(row) => {
                Err(ModelError::ContextFull { pos: row.pos, len: t, capacity: self.capacity })
            }
            None => Ok(()),
        }
    }

    pub(crate) fn advance(&mut self, t: usize) {
        for row in &mut self.rows {
            row.pos += t;
        }
    }

    /// Previous embeddings of all rows, (B, C) flattened.
    pub(crate) fn prev_embeddings(&self, c: usize) -> Vec<f32> {
        debug_assert_eq!(c, self.n_embd);
        self.rows.iter().flat_map(|row| row.prev.iter().copied()).collect()
    }

    /// Store each row's last embedding, `last` (B, C) flattened.
    pub(crate) fn set_prev_embeddings(&mut self, last: &[f32], c: usize) {
        for (row, e) in self.rows.iter_mut().zip(last.chunks_exact(c)) {
            row.prev.copy_from_slice(e);
        }
    }

    /// Whether every row's buffers are in host memory (the CPU decode step reads them there).
    pub(crate) fn on_host(&self) -> bool {
        self.rows.iter().all(|row| row.k.iter().chain(&row.v).all(|t| t.device() == Device::Cpu))
    }

    /// Row r's k and v buffers (1, capacity, Hkv, D) of `layer`, for the decode step to write
    /// and read in place.
    pub(crate) fn layer_kv(&self, layer: usize, r: usize) -> (&Tensor, &Tensor) {
        (&self.rows[r].k[layer], &self.rows[r].v[layer])
    }

    /// Row r's last post-norm embedding (C), for the decode step to read and replace.
    pub(crate) fn prev_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.rows[r].prev
    }

    /// Write k, v (1, T, Hkv, D) of layer `layer` at row `r`'s position and return the whole
    /// cache buffers (1, capacity, Hkv, D) for attention (positions past pos + T are not read).
    pub(crate) fn write(
        &mut self,
        layer: usize,
        r: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let row = &mut self.rows[r];
        for (cache, new) in [(&mut row.k[layer], k), (&mut row.v[layer], v)] {
            // Rows are made on the host; the first write moves a layer's buffers to the model's
            // device, after which new keys are written there (no host round trip per token).
            if cache.device() != new.device() {
                *cache = cache.to_device(new.device())?;
            }
            cache.write_block(1, row.pos, new)?;
        }
        Ok((row.k[layer].clone(), row.v[layer].clone()))
    }
}
