//! `Tensor`: shape + f32 storage on a `Device` + the op that produced it (if it is tracked).
//!
//! A tensor is immutable and cheap to clone (an `Arc`). The only mutation is of a leaf's data
//! (`with_data_mut`), which optimizers use between steps; storage sits behind an `RwLock` for
//! that, and a `reshape` shares its input's storage.
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::Device;
use crate::error::{EngineError, Result};
use crate::op::Op;

/// Where the numbers live. Only the host for now; a GPU buffer variant comes with the GPU device.
#[derive(Debug)]
pub enum Storage {
    Cpu(Vec<f32>),
}

impl Drop for Storage {
    fn drop(&mut self) {
        match self {
            Storage::Cpu(v) => crate::pool::recycle(std::mem::take(v)),
        }
    }
}

impl Storage {
    fn as_slice(&self) -> &[f32] {
        match self {
            Storage::Cpu(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        match self {
            Storage::Cpu(v) => v,
        }
    }
}

/// Identity of a tensor node, unique for the process lifetime; keys the gradient store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
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

/// Read access to a tensor's elements (row-major). Holding it blocks `with_data_mut`.
pub struct Data<'a>(RwLockReadGuard<'a, Storage>);

impl Deref for Data<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.0.as_slice()
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
        let requires_grad = op.is_some();
        Tensor(Arc::new(Node {
            id: TensorId::fresh(),
            shape,
            device: Device::Cpu,
            storage: Arc::new(RwLock::new(Storage::Cpu(data))),
            op,
            requires_grad,
        }))
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

    /// Borrow the elements (row-major).
    pub fn data(&self) -> Data<'_> {
        // A poisoned lock only means another thread panicked mid-update; the f32s are still
        // valid memory, so keep going rather than cascade the panic.
        Data(self.0.storage.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn to_vec(&self) -> Vec<f32> {
        self.data().to_vec()
    }

    /// The value of a single-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(EngineError::NotScalar { op: "item", shape: self.shape().to_vec() });
        }
        Ok(self.data()[0])
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
        Ok(f(guard.as_mut_slice()))
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
