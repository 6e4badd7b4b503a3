//! A small, bounded pickle reader and writer for the subset torch.save and pickle.dump of a
//! tiktoken.Encoding use (protocols 2-5). Nothing is executed: GLOBALs resolve to a closed
//! whitelist (`Global`), REDUCE/NEWOBJ/BUILD only accept what those few globals need, and
//! persistent ids only name torch storages.
//!
//! Bounds, so a hostile file is an error and never a crash or an unbounded allocation:
//! - every length is checked against the bytes left before anything is allocated;
//! - stack, marks and memo grow by at most one entry per opcode (so with the input size);
//! - BINGET shares (`Rc`), never deep-copies; a shared container that is then mutated is copied
//!   once (copy-on-write), and those copies draw from a budget proportional to the input;
//! - values nest at most `MAX_DEPTH` deep (dropping or walking a deeper tree would recurse).
//!
//! Memo semantics differ from Python's in one way: a container memoized and later filled is
//! seen empty through the memo. Python's pickler only BINGETs an object after it is complete
//! (and torch state dicts share no containers), so real files are unaffected.
mod read;
mod write;

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

pub use read::unpickle;
pub use write::Pickler;

/// Deepest nesting of containers accepted (torch state dicts nest about 6 deep).
pub(super) const MAX_DEPTH: u16 = 64;
/// Dimensions a tensor may have.
const MAX_DIMS: usize = 16;

/// An element type of a torch storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl TorchDtype {
    pub fn size(self) -> usize {
        match self {
            TorchDtype::F64 | TorchDtype::I64 => 8,
            TorchDtype::F32 | TorchDtype::I32 => 4,
            TorchDtype::F16 | TorchDtype::BF16 | TorchDtype::I16 => 2,
            TorchDtype::I8 | TorchDtype::U8 | TorchDtype::Bool => 1,
        }
    }

    /// torch's legacy storage class name (what torch.save pickles).
    pub fn storage_name(self) -> &'static str {
        match self {
            TorchDtype::F64 => "DoubleStorage",
            TorchDtype::F32 => "FloatStorage",
            TorchDtype::F16 => "HalfStorage",
            TorchDtype::BF16 => "BFloat16Storage",
            TorchDtype::I64 => "LongStorage",
            TorchDtype::I32 => "IntStorage",
            TorchDtype::I16 => "ShortStorage",
            TorchDtype::I8 => "CharStorage",
            TorchDtype::U8 => "ByteStorage",
            TorchDtype::Bool => "BoolStorage",
        }
    }

    const ALL: [TorchDtype; 10] = [
        TorchDtype::F64,
        TorchDtype::F32,
        TorchDtype::F16,
        TorchDtype::BF16,
        TorchDtype::I64,
        TorchDtype::I32,
        TorchDtype::I16,
        TorchDtype::I8,
        TorchDtype::U8,
        TorchDtype::Bool,
    ];
}

/// The only callables a pickle may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    /// collections.OrderedDict
    OrderedDict,
    /// torch._utils._rebuild_tensor_v2
    RebuildTensorV2,
    /// torch._utils._rebuild_parameter
    RebuildParameter,
    /// torch.<Dtype>Storage
    Storage(TorchDtype),
    /// tiktoken.core.Encoding
    TiktokenEncoding,
}

/// Which globals a file may name: a torch checkpoint or a pickled tiktoken.Encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allow {
    Torch,
    Tiktoken,
}

impl Global {
    fn resolve(module: &str, name: &str, allow: Allow) -> Option<Global> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", n) => {
                Global::Storage(TorchDtype::ALL.into_iter().find(|d| d.storage_name() == n)?)
            }
            ("tiktoken.core", "Encoding") => Global::TiktokenEncoding,
            _ => return None,
        };
        let ok = match allow {
            Allow::Torch => g != Global::TiktokenEncoding,
            Allow::Tiktoken => g == Global::TiktokenEncoding,
        };
        ok.then_some(g)
    }
}

/// A storage named by a persistent id: `data/<key>` in the archive holds `numel` elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub dtype: TorchDtype,
    pub key: String,
    pub numel: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view into a storage. Checked on
/// construction: every element it reads lies inside the storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

impl TensorRef {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// `None` when the view reads outside its storage (or its sizes overflow).
    pub(super) fn check(&self) -> Option<()> {
        if self.shape.len() != self.stride.len() || self.shape.len() > MAX_DIMS {
            return None;
        }
        let mut n: u64 = 1;
        for &d in &self.shape {
            n = n.checked_mul(d)?;
        }
        if n == 0 {
            return (self.offset <= self.storage.numel).then_some(());
        }
        let mut last = self.offset;
        for (&d, &s) in self.shape.iter().zip(&self.stride) {
            last = last.checked_add((d - 1).checked_mul(s)?)?;
        }
        // A view never holds more elements than its storage: state dicts have no broadcast
        // (stride 0) views, and this bounds what materialising a tensor allocates.
        (last < self.storage.numel && n <= self.storage.numel).then_some(())
    }
}

/// A dict key: pickled dicts here are keyed by strings, ints or bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    Int(i64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
}

/// Items in pickle order plus a nesting depth.
#[derive(Clone, Debug, Default)]
pub struct Seq {
    pub items: Vec<Value>,
    pub(super) depth: u16,
}

/// A dict in insertion order; a repeated key replaces the earlier value, as in Python.
#[derive(Clone, Debug, Default)]
pub struct Map {
    pub items: Vec<(Key, Value)>,
    index: HashMap<Key, usize>,
    pub(super) depth: u16,
}

impl Map {
    pub fn get(&self, key: &str) -> Option<&Value> {
        let k = Key::Str(Rc::from(key));
        self.index.get(&k).map(|&i| &self.items[i].1)
    }

    pub fn get_int(&self, key: i64) -> Option<&Value> {
        self.index.get(&Key::Int(key)).map(|&i| &self.items[i].1)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn insert(&mut self, k: Key, v: Value) {
        self.depth = self.depth.max(v.depth() + 1);
        match self.index.get(&k) {
            Some(&i) => self.items[i].1 = v,
            None => {
                self.index.insert(k.clone(), self.items.len());
                self.items.push((k, v));
            }
        }
    }
}

/// An instance built by NEWOBJ (+ BUILD): only tiktoken.Encoding, whose state is a dict.
#[derive(Clone, Debug)]
pub struct Object {
    pub class: Global,
    pub state: Option<Value>,
}

/// A pickled value. Cloning is cheap (containers are shared).
#[derive(Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Seq>),
    List(Rc<Seq>),
    Dict(Rc<Map>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    Object(Rc<Object>),
}

impl fmt::Debug for Value {
    // Shallow on purpose: a hostile DAG of shared containers would print exponentially.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "Int({i})"),
            Value::Float(x) => write!(f, "Float({x})"),
            Value::Bool(b) => write!(f, "Bool({b})"),
            Value::Str(s) => write!(f, "Str({s:?})"),
            Value::Tensor(t) => write!(f, "Tensor({:?} {:?})", t.storage.dtype, t.shape),
            Value::Tuple(s) | Value::List(s) => write!(f, "{}[{}]", self.kind(), s.items.len()),
            Value::Dict(m) => write!(f, "dict[{}]", m.items.len()),
            _ => write!(f, "{}", self.kind()),
        }
    }
}

impl Value {
    /// What the value is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Object(_) => "object",
        }
    }

    pub(super) fn depth(&self) -> u16 {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(m) => m.depth,
            Value::Object(o) => 1 + o.state.as_ref().map_or(0, Value::depth),
            _ => 0,
        }
    }

    pub fn as_dict(&self) -> Option<&Map> {
        match self {
            Value::Dict(m) => Some(m),
            _ => None,
        }
    }

    /// Items of a list or a tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(s) | Value::Tuple(s) => Some(&s.items),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// A float, or an int as a float (Python stores 0.0 and 0 alike in hyper-parameters).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(x) => Some(*x),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_tensor(&self) -> Option<&TensorRef> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    pub(super) fn seq(items: Vec<Value>) -> Seq {
        let depth = items.iter().map(|v| v.depth() + 1).max().unwrap_or(1);
        Seq { items, depth }
    }
}

/// Why a pickle was refused: the byte offset of the opcode and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickleError {
    pub offset: usize,
    pub msg: String,
}

pub(crate) type Res<T> = std::result::Result<T, PickleError>;

pub(crate) mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINUNICODE: u8 = b'X';
    pub const EMPTY_LIST: u8 = b']';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const BINFLOAT: u8 = b'G';
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// Build values for the writer.
pub fn dict(items: Vec<(&str, Value)>) -> Value {
    let mut m = Map { depth: 1, ..Map::default() };
    for (k, v) in items {
        m.insert(Key::Str(Rc::from(k)), v);
    }
    Value::Dict(Rc::new(m))
}

/// A dict keyed by any `Key`s.
pub fn dict_keyed(items: Vec<(Key, Value)>) -> Value {
    let mut m = Map { depth: 1, ..Map::default() };
    for (k, v) in items {
        m.insert(k, v);
    }
    Value::Dict(Rc::new(m))
}

pub fn list(items: Vec<Value>) -> Value {
    Value::List(Rc::new(Value::seq(items)))
}

pub fn tuple(items: Vec<Value>) -> Value {
    Value::Tuple(Rc::new(Value::seq(items)))
}

pub fn str(s: &str) -> Value {
    Value::Str(Rc::from(s))
}

#[cfg(test)]
mod tests;
