//! The pickler: the opcodes torch.save and pickle.dump of a tiktoken.Encoding write.
use super::{Key, TensorRef, TorchDtype, Value, op};

/// Writes the same subset: enough for torch.load of a state dict or an optimizer state and
/// pickle.load of a tiktoken.Encoding.
pub struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    /// Protocol 2 is what torch.save writes; bytes need protocol 3.
    pub fn new(protocol: u8) -> Pickler {
        Pickler { out: vec![op::PROTO, protocol] }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(op::STOP);
        self.out
    }

    pub fn op(&mut self, code: u8) {
        self.out.push(code);
    }

    pub fn global(&mut self, module: &str, name: &str) {
        self.out.push(op::GLOBAL);
        for part in [module, name] {
            self.out.extend_from_slice(part.as_bytes());
            self.out.push(b'\n');
        }
    }

    pub fn int(&mut self, v: i64) {
        if (0..=0xff).contains(&v) {
            self.out.extend([op::BININT1, v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(op::BININT2);
            self.out.extend((v as u16).to_le_bytes());
        } else if let Ok(v) = i32::try_from(v) {
            self.out.push(op::BININT);
            self.out.extend(v.to_le_bytes());
        } else {
            self.out.extend([op::LONG1, 8]);
            self.out.extend(v.to_le_bytes());
        }
    }

    pub fn float(&mut self, v: f64) {
        self.out.push(op::BINFLOAT);
        self.out.extend(v.to_be_bytes());
    }

    pub fn str(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.out.push(op::BINBYTES);
        self.out.extend((b.len() as u32).to_le_bytes());
        self.out.extend_from_slice(b);
    }

    /// Any plain value (no globals, storages or objects; tensors are written by the caller).
    pub fn value(&mut self, v: &Value, tensor: &mut dyn FnMut(&mut Pickler, &TensorRef)) {
        match v {
            Value::None => self.op(op::NONE),
            Value::Bool(b) => self.op(if *b { op::NEWTRUE } else { op::NEWFALSE }),
            Value::Int(i) => self.int(*i),
            Value::Float(x) => self.float(*x),
            Value::Str(s) => self.str(s),
            Value::Bytes(b) => self.bytes(b),
            Value::Tuple(t) => {
                self.op(op::MARK);
                for x in &t.items {
                    self.value(x, tensor);
                }
                self.op(op::TUPLE);
            }
            Value::List(l) => {
                self.op(op::EMPTY_LIST);
                if !l.items.is_empty() {
                    self.op(op::MARK);
                    for x in &l.items {
                        self.value(x, tensor);
                    }
                    self.op(op::APPENDS);
                }
            }
            Value::Dict(m) => {
                self.op(op::EMPTY_DICT);
                if !m.items.is_empty() {
                    self.op(op::MARK);
                    for (k, x) in &m.items {
                        match k {
                            Key::Int(i) => self.int(*i),
                            Key::Str(s) => self.str(s),
                            Key::Bytes(b) => self.bytes(b),
                        }
                        self.value(x, tensor);
                    }
                    self.op(op::SETITEMS);
                }
            }
            Value::Tensor(t) => tensor(self, t),
            // Not produced by the writers in this crate.
            Value::Global(_) | Value::Storage(_) | Value::Object(_) => self.op(op::NONE),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
    pub fn tensor(&mut self, t: &TensorRef) {
        let dims = |d: &[u64]| d.iter().map(|&x| x as i64).collect::<Vec<_>>();
        let s = &t.storage;
        self.tensor_parts(
            s.dtype,
            &s.key,
            s.numel as i64,
            t.offset as i64,
            &dims(&t.shape),
            &dims(&t.stride),
        );
    }

    /// `tensor` from unchecked parts (tests write malformed tensors with it): the storage's
    /// persistent id `('storage', torch.<T>Storage, key, 'cpu', numel)`, then the view.
    pub fn tensor_parts(
        &mut self,
        dtype: TorchDtype,
        key: &str,
        numel: i64,
        offset: i64,
        shape: &[i64],
        stride: &[i64],
    ) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(op::MARK);
        self.op(op::MARK);
        self.str("storage");
        self.global("torch", dtype.storage_name());
        self.str(key);
        self.str("cpu");
        self.int(numel);
        self.op(op::TUPLE);
        self.op(op::BINPERSID);
        self.int(offset);
        for dims in [shape, stride] {
            self.op(op::MARK);
            for &d in dims {
                self.int(d);
            }
            self.op(op::TUPLE);
        }
        self.op(op::NEWFALSE);
        self.global("collections", "OrderedDict");
        self.op(op::EMPTY_TUPLE);
        self.op(op::REDUCE);
        self.op(op::TUPLE);
        self.op(op::REDUCE);
    }

    /// `collections.OrderedDict()` then SETITEMS, the way torch.save writes a state dict.
    pub fn ordered_dict(&mut self, items: &mut dyn FnMut(&mut Pickler)) {
        self.global("collections", "OrderedDict");
        self.op(op::EMPTY_TUPLE);
        self.op(op::REDUCE);
        self.op(op::MARK);
        items(self);
        self.op(op::SETITEMS);
    }

    /// `tiktoken.core.Encoding` built from `state` (NEWOBJ then BUILD, as pickle.dump does).
    pub fn tiktoken_encoding(&mut self, state: &Value) {
        self.global("tiktoken.core", "Encoding");
        self.op(op::EMPTY_TUPLE);
        self.op(op::NEWOBJ);
        self.value(state, &mut |_, _| {});
        self.op(op::BUILD);
    }
}
