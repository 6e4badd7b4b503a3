//! `Tensor`: shape + f32 storage on a `Device` + the op that produced it (if it is tracked).
//!
//! A tensor is immutable and cheap to clone (an `Arc`). The only mutation is of a leaf's data
//! (`with_data_mut`), which optimizers use between steps; storage sits behind an `RwLock` for
//! that, and a `reshape` shares its input's storage.
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use femtochat_kernels::gpu::GpuBuffer;

use crate::Device;
use crate::device::{record, sync};
use crate::error::{EngineError, Result};
use crate::op::Op;

/// Where the numbers live: host memory or a GPU storage buffer. Also the type of saved
/// backward buffers and gradients, which live where their tensors do.
pub enum Storage {
    Cpu(Vec<f32>),
    Gpu(GpuBuffer),
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Cpu(v) => write!(f, "Cpu({} floats)", v.len()),
            Storage::Gpu(b) => write!(f, "Gpu({} floats)", b.len()),
        }
    }
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Gpu(_) => Device::Gpu,
        }
    }

    /// Host elements; only reached on CPU graphs (ops never mix devices), so a GPU buffer here
    /// is an engine bug, caught in debug builds.
    pub(crate) fn host(&self) -> &[f32] {
        match self {
            Storage::Cpu(v) => v,
            Storage::Gpu(_) => {
                debug_assert!(false, "host() on GPU storage");
                &[]
            }
        }
    }

    /// The GPU buffer; the mirror of `host`.
    pub(crate) fn gpu_buf(&self) -> Result<&GpuBuffer> {
        match self {
            Storage::Gpu(b) => Ok(b),
            Storage::Cpu(_) => Err(EngineError::Gpu(
                "expected GPU storage, found host storage (engine bug)".into(),
            )),
        }
    }

    /// Take the host vector out (leaving an empty one), for moving a gradient into a tensor.
    pub(crate) fn take_host(&mut self) -> Vec<f32> {
        match self {
            Storage::Cpu(v) => std::mem::take(v),
            Storage::Gpu(_) => Vec::new(),
        }
    }

    /// A copy of the elements on the host (a GPU buffer is downloaded, after submitting all
    /// recorded work).
    pub(crate) fn to_host(&self) -> Result<Vec<f32>> {
        match self {
            Storage::Cpu(v) => Ok(v.clone()),
            Storage::Gpu(b) => {
                sync();
                Ok(b.to_vec()?)
            }
        }
    }
}

/// Identity of a tensor node, unique for the process lifetime; keys the gradient store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl TensorId {
    fn fresh() -> Self {
        TensorId(NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }

    /// A bound below every id handed out from now on (ids only grow).
    pub(crate) fn peek_next() -> Self {
        TensorId(NEXT_ID.load(Ordering::Relaxed))
    }
}

struct Node {
    id: TensorId,
    shape: Vec<usize>,
    device: Device,
    storage: Arc<RwLock<Storage>>,
    /// `Some` for a tracked result (it requires grad); `None` for a leaf.
    op: Option<Op>,
    requires_grad: bool,
}

// Dropping a long chain recursively (node -> op -> input node -> ...) would overflow the stack,
// so ops are unlinked iteratively: a node we hold the last reference to gives up its op here
// instead of dropping it inside its own drop.
impl Drop for Node {
    fn drop(&mut self) {
        // The last owner of host storage hands its memory to the recycler (GPU buffers go back
        // to their pool on their own drop).
        if let Some(lock) = Arc::get_mut(&mut self.storage)
            && let Storage::Cpu(v) = lock.get_mut().unwrap_or_else(|e| e.into_inner())
        {
            crate::pool::recycle(std::mem::take(v));
        }
        let Some(op) = self.op.take() else { return };
        let mut pending = vec![op];
        while let Some(op) = pending.pop() {
            for t in op.into_inputs() {
                if let Ok(mut node) = Arc::try_unwrap(t.0)
                    && let Some(op) = node.op.take()
                {
                    pending.push(op);
                }
            }
        }
    }
}

#[derive(Clone)]
pub struct Tensor(Arc<Node>);

/// Read access to a tensor's elements (row-major): a borrow of host storage (holding it blocks
/// `with_data_mut`), or a downloaded copy of a GPU tensor.
pub enum Data<'a> {
    Host(RwLockReadGuard<'a, Storage>),
    Copied(Vec<f32>),
}

impl Deref for Data<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Data::Host(g) => g.host(),
            Data::Copied(v) => v,
        }
    }
}

impl Tensor {
    fn new_leaf(data: Vec<f32>, shape: &[usize], requires_grad: bool) -> Tensor {
        Tensor(Arc::new(Node {
            id: TensorId::fresh(),
            shape: shape.to_vec(),
            device: Device::Cpu,
            storage: Arc::new(RwLock::new(Storage::Cpu(data))),
            op: None,
            requires_grad,
        }))
    }

    /// A constant (not trainable) tensor; `data.len()` must equal the product of `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        check_len("from_vec", &data, shape)?;
        Ok(Tensor::new_leaf(data, shape, false))
    }

    /// A trainable leaf: gradients flow to it and `backward` reports its gradient.
    pub fn param(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        check_len("param", &data, shape)?;
        Ok(Tensor::new_leaf(data, shape, true))
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    pub fn full(shape: &[usize], value: f32) -> Tensor {
        Tensor::new_leaf(vec![value; shape.iter().product()], shape, false)
    }

    /// A rank-0 constant.
    pub fn scalar(value: f32) -> Tensor {
        Tensor::new_leaf(vec![value], &[], false)
    }

    /// A trainable leaf sharing this tensor's storage (so `with_data_mut` on it updates both).
    pub fn to_param(&self) -> Tensor {
        self.leaf_sharing(true)
    }

    /// A constant leaf sharing this tensor's storage, cut from the graph.
    pub fn detach(&self) -> Tensor {
        self.leaf_sharing(false)
    }

    fn leaf_sharing(&self, requires_grad: bool) -> Tensor {
        Tensor(Arc::new(Node {
            id: TensorId::fresh(),
            shape: self.0.shape.clone(),
            device: self.0.device,
            storage: self.0.storage.clone(),
            op: None,
            requires_grad,
        }))
    }

    /// The result of an op; tracked (and so requiring grad) when `op` is `Some`.
    pub(crate) fn from_op(data: Vec<f32>, shape: Vec<usize>, op: Option<Op>) -> Tensor {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Tensor::from_storage(Storage::Cpu(data), shape, op)
    }

    /// The result of an op on the GPU.
    pub(crate) fn from_gpu(buf: GpuBuffer, shape: Vec<usize>, op: Option<Op>) -> Tensor {
        debug_assert_eq!(buf.len(), shape.iter().product::<usize>());
        Tensor::from_storage(Storage::Gpu(buf), shape, op)
    }

    pub(crate) fn from_storage(storage: Storage, shape: Vec<usize>, op: Option<Op>) -> Tensor {
        let requires_grad = op.is_some();
        Tensor(Arc::new(Node {
            id: TensorId::fresh(),
            shape,
            device: storage.device(),
            storage: Arc::new(RwLock::new(storage)),
            op,
            requires_grad,
        }))
    }

    /// A copy on `device` (this tensor itself when it is already there). A trainable leaf stays
    /// a trainable leaf; anything else becomes a constant cut from the graph.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let storage = match device {
            Device::Cpu => Storage::Cpu(self.storage().to_host()?),
            Device::Gpu => {
                let data = self.to_vec();
                Storage::Gpu(record(|bt| bt.upload(&data))?)
            }
        };
        let leaf = Tensor::from_storage(storage, self.shape().to_vec(), None);
        Ok(if self.is_leaf() && self.requires_grad() { leaf.to_param() } else { leaf })
    }

    /// Read access to the storage itself (for the GPU paths of ops).
    pub(crate) fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A result viewing `self`'s storage under another shape (reshape).
    pub(crate) fn view_as(&self, shape: Vec<usize>, op: Option<Op>) -> Tensor {
        let requires_grad = op.is_some();
        Tensor(Arc::new(Node {
            id: TensorId::fresh(),
            shape,
            device: self.0.device,
            storage: self.0.storage.clone(),
            op,
            requires_grad,
        }))
    }

    pub fn id(&self) -> TensorId {
        self.0.id
    }

    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.0.shape.iter().product()
    }

    pub fn device(&self) -> Device {
        self.0.device
    }

    /// True for a trainable leaf and for every tracked op result.
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }

    pub fn is_leaf(&self) -> bool {
        self.0.op.is_none()
    }

    pub(crate) fn op(&self) -> Option<&Op> {
        self.0.op.as_ref()
    }

    /// Borrow the elements (row-major); a GPU tensor is downloaded (after all recorded work).
    /// A failed download (a lost GPU device) is reported on stderr and reads as NaNs, so it
    /// cannot pass for real numbers; `try_to_vec` returns the error instead.
    pub fn data(&self) -> Data<'_> {
        // A poisoned lock only means another thread panicked mid-update; the f32s are still
        // valid memory, so keep going rather than cascade the panic.
        let guard = self.storage();
        if matches!(&*guard, Storage::Cpu(_)) {
            return Data::Host(guard);
        }
        Data::Copied(guard.to_host().unwrap_or_else(|e| {
            eprintln!("femtochat: reading a GPU tensor failed: {e}");
            vec![f32::NAN; self.numel()]
        }))
    }

    /// The elements on the host, or the download error of a GPU tensor.
    pub fn try_to_vec(&self) -> Result<Vec<f32>> {
        self.storage().to_host()
    }

    pub fn to_vec(&self) -> Vec<f32> {
        self.data().to_vec()
    }

    /// The value of a single-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(EngineError::NotScalar { op: "item", shape: self.shape().to_vec() });
        }
        Ok(self.try_to_vec()?[0])
    }

    /// Mutate a leaf's elements in place (optimizer updates). Errors on an op result, whose
    /// data the graph may still need for backward. Must not be called while a `Data` borrow of
    /// the same storage is alive on this thread (that would deadlock).
    pub fn with_data_mut<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
        if !self.is_leaf() {
            return Err(EngineError::Invalid {
                op: "with_data_mut",
                msg: "only leaf tensors can be modified in place".into(),
            });
        }
        let mut guard = self.0.storage.write().unwrap_or_else(|e| e.into_inner());
        match &mut *guard {
            Storage::Cpu(v) => Ok(f(v)),
            // Round trip through the host (optimizer updates not yet ported to WGSL).
            Storage::Gpu(b) => {
                sync();
                let mut host: Vec<f32> = b.to_vec()?;
                let r = f(&mut host);
                let b = &*b;
                record(|bt| {
                    let tmp = bt.upload(&host)?;
                    bt.copy(b, &tmp)
                })?;
                Ok(r)
            }
        }
    }

    /// Overwrite indices start..start+src.shape[dim] of `dim` of this leaf with `src` (same
    /// device, same other dims), on the device: how KV caches take new rows without a copy to
    /// the host.
    pub fn write_block(&self, dim: usize, start: usize, src: &Tensor) -> Result<()> {
        let bad = || EngineError::ShapeMismatch {
            op: "write_block",
            lhs: self.shape().to_vec(),
            rhs: src.shape().to_vec(),
        };
        if !self.is_leaf() {
            return Err(EngineError::Invalid {
                op: "write_block",
                msg: "only leaf tensors can be modified in place".into(),
            });
        }
        if dim >= self.rank() || src.rank() != self.rank() {
            return Err(bad());
        }
        let same = (0..self.rank()).all(|d| d == dim || self.shape()[d] == src.shape()[d]);
        let len = src.shape()[dim];
        if !same {
            return Err(bad());
        }
        if start + len > self.shape()[dim] {
            return Err(EngineError::OutOfBounds {
                op: "write_block",
                start,
                end: start + len,
                size: self.shape()[dim],
            });
        }
        if src.device() != self.device() {
            return Err(EngineError::DeviceMismatch {
                op: "write_block",
                lhs: self.device(),
                rhs: src.device(),
            });
        }
        if Arc::ptr_eq(&self.0.storage, &src.0.storage) {
            return Err(EngineError::Invalid {
                op: "write_block",
                msg: "source and destination share storage".into(),
            });
        }
        let outer: usize = self.shape()[..dim].iter().product();
        let inner: usize = self.shape()[dim + 1..].iter().product();
        let n = self.shape()[dim];
        let dv = femtochat_kernels::cpu::slice::BlockView { n, off: start };
        let sv = femtochat_kernels::cpu::slice::BlockView { n: len, off: 0 };
        let src_guard = src.storage();
        let mut guard = self.0.storage.write().unwrap_or_else(|e| e.into_inner());
        match (&mut *guard, &*src_guard) {
            (Storage::Cpu(d), Storage::Cpu(s)) => {
                femtochat_kernels::cpu::slice::copy_block(d, dv, s, sv, outer, len, inner, false);
            }
            (Storage::Gpu(d), Storage::Gpu(s)) => {
                let d = &*d;
                record(|bt| {
                    femtochat_kernels::gpu::slice::copy_block(
                        bt, d, dv, s, sv, outer, len, inner, false,
                    )
                })?;
            }
            _ => return Err(bad()),
        }
        Ok(())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("id", &self.0.id)
            .field("shape", &self.0.shape)
            .field("device", &self.0.device)
            .field("requires_grad", &self.0.requires_grad)
            .finish_non_exhaustive()
    }
}

/// The element count of `shape`, `None` if it overflows usize.
pub(crate) fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

fn check_len(op: &'static str, data: &[f32], shape: &[usize]) -> Result<()> {
    let expected = checked_numel(shape).unwrap_or(usize::MAX);
    if data.len() != expected {
        return Err(EngineError::DataLength {
            op,
            shape: shape.to_vec(),
            expected,
            got: data.len(),
        });
    }
    Ok(())
}

/// Integer token ids with a shape, e.g. a (B, T) batch; the input of `embedding`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ids {
    data: Arc<Vec<u32>>,
    shape: Vec<usize>,
}

impl Ids {
    pub fn new(data: Vec<u32>, shape: &[usize]) -> Result<Ids> {
        let expected = checked_numel(shape).unwrap_or(usize::MAX);
        if data.len() != expected {
            return Err(EngineError::DataLength {
                op: "Ids::new",
                shape: shape.to_vec(),
                expected,
                got: data.len(),
            });
        }
        Ok(Ids { data: Arc::new(data), shape: shape.to_vec() })
    }

    /// From signed ids (e.g. int64 fixtures); errors on a negative or > u32::MAX id.
    pub fn from_i64(data: &[i64], shape: &[usize]) -> Result<Ids> {
        let ids = data
            .iter()
            .enumerate()
            .map(|(pos, &id)| {
                u32::try_from(id).map_err(|_| EngineError::IdOutOfRange {
                    op: "Ids::from_i64",
                    id,
                    pos,
                    bound: u32::MAX as usize + 1,
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        Ids::new(ids, shape)
    }

    pub fn data(&self) -> &[u32] {
        &self.data
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}
