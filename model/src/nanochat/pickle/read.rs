//! The unpickler: a loop over opcodes with a value stack, a mark stack and a memo.
use std::collections::HashMap;
use std::rc::Rc;

use super::{
    Allow, Global, Key, MAX_DEPTH, Map, Object, PickleError, Res, Seq, StorageRef, TensorRef,
    Value, op,
};

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed (for errors).
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    allow: Allow,
    /// Container items that copy-on-write may still copy.
    copy_budget: usize,
}

/// Parse a pickle. `allow` picks the globals it may name.
pub fn unpickle(data: &[u8], allow: Allow) -> Res<Value> {
    let mut u = Unpickler {
        data,
        pos: 0,
        at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        allow,
        copy_budget: 4 * data.len() + 1024,
    };
    u.run()
}

impl<'a> Unpickler<'a> {
    fn err<T>(&self, msg: impl Into<String>) -> Res<T> {
        Err(PickleError { offset: self.at, msg: msg.into() })
    }

    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        match self.data.get(self.pos..self.pos.saturating_add(n)) {
            Some(s) if self.pos.checked_add(n).is_some() => {
                self.pos += n;
                Ok(s)
            }
            _ => self.err(format!(
                "truncated: needs {n} bytes, {} left",
                self.data.len().saturating_sub(self.pos)
            )),
        }
    }

    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let b = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// A length prefix, checked against the bytes left before anything is allocated.
    fn len_checked(&mut self, n: u64) -> Res<usize> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return self.err(format!("declares {n} bytes but only {left} are left"));
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> Res<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("GLOBAL name without a newline");
        };
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).or_else(|_| self.err("GLOBAL name is not UTF-8"))
    }

    fn text(&mut self, n: u64) -> Res<Value> {
        let n = self.len_checked(n)?;
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => self.err("string is not valid UTF-8"),
        }
    }

    fn bytes(&mut self, n: u64) -> Res<Value> {
        let n = self.len_checked(n)?;
        Ok(Value::Bytes(Rc::from(self.take(n)?)))
    }

    fn pop(&mut self) -> Res<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        self.stack.pop().map_or_else(|| self.err("stack underflow"), Ok)
    }

    fn pop_mark(&mut self) -> Res<Vec<Value>> {
        let Some(m) = self.marks.pop() else {
            return self.err("no MARK to pop to");
        };
        Ok(self.stack.split_off(m))
    }

    fn push(&mut self, v: Value) -> Res<()> {
        if v.depth() > MAX_DEPTH {
            return self.err(format!("values nest deeper than {MAX_DEPTH}"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn top_mut(&mut self) -> Res<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        let at = self.at;
        self.stack.last_mut().ok_or(PickleError { offset: at, msg: "stack underflow".into() })
    }

    /// Charge a copy-on-write of `n` items (when the container is shared).
    fn charge(&mut self, shared: bool, n: usize) -> Res<()> {
        if shared {
            if n > self.copy_budget {
                return self.err("shared containers are copied more than the input size allows");
            }
            self.copy_budget -= n;
        }
        Ok(())
    }

    fn key(&self, v: Value) -> Res<Key> {
        match v {
            Value::Int(i) => Ok(Key::Int(i)),
            Value::Str(s) => Ok(Key::Str(s)),
            Value::Bytes(b) => Ok(Key::Bytes(b)),
            other => self.err(format!("dict key of type {} (only str, int, bytes)", other.kind())),
        }
    }

    /// Add items to the list/dict at stack[at] (APPEND(S), SETITEM(S)).
    fn extend(&mut self, at: usize, items: Vec<Value>) -> Res<()> {
        let Some(target) = self.stack.get(at) else {
            return self.err("stack underflow");
        };
        match target {
            Value::List(l) => {
                let (shared, n) = (Rc::strong_count(l) > 1, l.items.len());
                self.charge(shared, n)?;
                let mut new_depth = 0;
                for v in &items {
                    new_depth = new_depth.max(v.depth() + 1);
                }
                if new_depth > MAX_DEPTH {
                    return self.err(format!("values nest deeper than {MAX_DEPTH}"));
                }
                if let Some(Value::List(l)) = self.stack.get_mut(at) {
                    let l = Rc::make_mut(l);
                    l.depth = l.depth.max(new_depth);
                    l.items.extend(items);
                }
                Ok(())
            }
            Value::Dict(m) => {
                if !items.len().is_multiple_of(2) {
                    return self.err("SETITEMS with an odd number of items");
                }
                let (shared, n) = (Rc::strong_count(m) > 1, m.items.len());
                self.charge(shared, n)?;
                let mut pairs = Vec::with_capacity(items.len() / 2);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if v.depth() + 1 > MAX_DEPTH {
                        return self.err(format!("values nest deeper than {MAX_DEPTH}"));
                    }
                    pairs.push((self.key(k)?, v));
                }
                if let Some(Value::Dict(m)) = self.stack.get_mut(at) {
                    let m = Rc::make_mut(m);
                    for (k, v) in pairs {
                        m.insert(k, v);
                    }
                }
                Ok(())
            }
            other => self.err(format!("cannot add items to a {}", other.kind())),
        }
    }

    fn global(&self, module: &str, name: &str) -> Res<Value> {
        match Global::resolve(module, name, self.allow) {
            Some(g) => Ok(Value::Global(g)),
            None => self.err(format!(
                "GLOBAL {module}.{name} is not allowed here (a {} file may name only {})",
                match self.allow {
                    Allow::Torch => "torch checkpoint",
                    Allow::Tiktoken => "tiktoken",
                },
                match self.allow {
                    Allow::Torch =>
                        "collections.OrderedDict, torch._utils._rebuild_tensor_v2/_rebuild_parameter and torch.*Storage",
                    Allow::Tiktoken => "tiktoken.core.Encoding",
                }
            )),
        }
    }

    fn reduce(&self, f: Value, args: Value) -> Res<Value> {
        let Value::Global(g) = f else {
            return self.err(format!("REDUCE calls a {}, not an allowed global", f.kind()));
        };
        let Value::Tuple(args) = args else {
            return self.err("REDUCE arguments are not a tuple");
        };
        let a = &args.items;
        match g {
            Global::OrderedDict if a.is_empty() => Ok(Value::Dict(Rc::default())),
            Global::RebuildTensorV2 if (6..=7).contains(&a.len()) => self.rebuild_tensor(a),
            Global::RebuildParameter if a.len() == 3 => match &a[0] {
                Value::Tensor(_) => Ok(a[0].clone()),
                other => self.err(format!("_rebuild_parameter of a {}", other.kind())),
            },
            other => self.err(format!("REDUCE of {other:?} with {} arguments", a.len())),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&self, a: &[Value]) -> Res<Value> {
        let Value::Storage(storage) = &a[0] else {
            return self.err(format!("tensor storage is a {}", a[0].kind()));
        };
        let dims = |v: &Value, what: &str| -> Res<Vec<u64>> {
            let Value::Tuple(t) = v else {
                return self.err(format!("tensor {what} is a {}, not a tuple", v.kind()));
            };
            t.items
                .iter()
                .map(|d| match d.as_int() {
                    Some(i) if i >= 0 => Ok(i as u64),
                    _ => self.err(format!("tensor {what} holds {d:?}")),
                })
                .collect()
        };
        let offset = match a[1].as_int() {
            Some(o) if o >= 0 => o as u64,
            _ => return self.err(format!("tensor offset is {:?}", a[1])),
        };
        let t = TensorRef {
            storage: (**storage).clone(),
            offset,
            shape: dims(&a[2], "size")?,
            stride: dims(&a[3], "stride")?,
        };
        if t.check().is_none() {
            return self.err(format!(
                "tensor of shape {:?} stride {:?} at offset {} does not fit its storage `{}` of {} elements",
                t.shape, t.stride, t.offset, t.storage.key, t.storage.numel
            ));
        }
        Ok(Value::Tensor(Rc::new(t)))
    }

    /// A persistent id: `('storage', torch.<T>Storage, key, location, numel)`.
    fn persistent(&self, pid: Value) -> Res<Value> {
        if self.allow != Allow::Torch {
            return self.err("persistent ids are only allowed in torch checkpoints");
        }
        let items = match &pid {
            Value::Tuple(t) if t.items.len() == 5 => &t.items,
            _ => return self.err(format!("persistent id is a {pid:?}, not a 5-tuple")),
        };
        let (Some("storage"), Value::Global(Global::Storage(dtype)), Some(key), Some(_), Some(n)) =
            (items[0].as_str(), &items[1], items[2].as_str(), items[3].as_str(), items[4].as_int())
        else {
            return self
                .err("persistent id is not ('storage', torch.<T>Storage, key, location, numel)");
        };
        if key.is_empty()
            || key.len() > 64
            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return self.err(format!("storage key {key:?} is not a plain name"));
        }
        if n < 0 {
            return self.err(format!("storage `{key}` declares {n} elements"));
        }
        Ok(Value::Storage(Rc::new(StorageRef {
            dtype: *dtype,
            key: key.to_string(),
            numel: n as u64,
        })))
    }

    fn run(&mut self) -> Res<Value> {
        loop {
            self.at = self.pos;
            let code = self.u8()?;
            match code {
                op::PROTO => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return self.err(format!("pickle protocol {p} (only 2-5 are read)"));
                    }
                }
                op::FRAME => {
                    self.take(8)?;
                }
                op::STOP => {
                    return match (self.stack.len(), self.marks.is_empty()) {
                        (1, true) => self.pop(),
                        _ => self.err(format!(
                            "STOP with {} values and {} marks on the stack (expected one value)",
                            self.stack.len(),
                            self.marks.len()
                        )),
                    };
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::NONE => self.push(Value::None)?,
                op::NEWTRUE => self.push(Value::Bool(true))?,
                op::NEWFALSE => self.push(Value::Bool(false))?,
                op::BININT => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(v as i64))?;
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(v as i64))?;
                }
                op::LONG1 => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return self.err(format!("integer of {n} bytes does not fit 64 bits"));
                    }
                    let b = self.take(n)?;
                    let mut buf =
                        if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v))?;
                }
                op::BINUNICODE => {
                    let n = u32::from_le_bytes(self.array()?) as u64;
                    let v = self.text(n)?;
                    self.push(v)?;
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8()? as u64;
                    let v = self.text(n)?;
                    self.push(v)?;
                }
                op::BINUNICODE8 => {
                    let n = u64::from_le_bytes(self.array()?);
                    let v = self.text(n)?;
                    self.push(v)?;
                }
                op::SHORT_BINBYTES => {
                    let n = self.u8()? as u64;
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                op::BINBYTES => {
                    let n = u32::from_le_bytes(self.array()?) as u64;
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                op::BINBYTES8 => {
                    let n = u64::from_le_bytes(self.array()?);
                    let v = self.bytes(n)?;
                    self.push(v)?;
                }
                op::EMPTY_TUPLE => self.push(Value::Tuple(Rc::new(Value::seq(Vec::new()))))?,
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(Value::seq(items))))?;
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (code - op::TUPLE1 + 1) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::new(Value::seq(items))))?;
                }
                op::EMPTY_LIST => {
                    self.push(Value::List(Rc::new(Seq { items: Vec::new(), depth: 1 })))?
                }
                op::EMPTY_DICT => {
                    self.push(Value::Dict(Rc::new(Map { depth: 1, ..Map::default() })))?
                }
                op::APPEND => {
                    let v = self.pop()?;
                    let at = self
                        .stack
                        .len()
                        .checked_sub(1)
                        .map_or_else(|| self.err("stack underflow"), Ok)?;
                    self.extend(at, vec![v])?;
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let at = self
                        .stack
                        .len()
                        .checked_sub(1)
                        .map_or_else(|| self.err("stack underflow"), Ok)?;
                    self.extend(at, vec![k, v])?;
                }
                op::APPENDS | op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let at = self
                        .stack
                        .len()
                        .checked_sub(1)
                        .map_or_else(|| self.err("no container before MARK"), Ok)?;
                    if self.marks.last().is_some_and(|&m| m > at) {
                        return self.err("no container before MARK");
                    }
                    self.extend(at, items)?;
                }
                op::BINPUT => {
                    let i = self.u8()? as u32;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(i, v);
                }
                op::LONG_BINPUT => {
                    let i = u32::from_le_bytes(self.array()?);
                    let v = self.top_mut()?.clone();
                    self.memo.insert(i, v);
                }
                op::MEMOIZE => {
                    let i = self.memo.len() as u32;
                    let v = self.top_mut()?.clone();
                    self.memo.insert(i, v);
                }
                op::BINGET | op::LONG_BINGET => {
                    let i = if code == op::BINGET {
                        self.u8()? as u32
                    } else {
                        u32::from_le_bytes(self.array()?)
                    };
                    let Some(v) = self.memo.get(&i).cloned() else {
                        return self.err(format!("memo entry {i} was never stored"));
                    };
                    self.push(v)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.push(g)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                        return self.err("STACK_GLOBAL of non-strings");
                    };
                    let g = self.global(m, n)?;
                    self.push(g)?;
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.push(v)?;
                }
                op::NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match (&cls, args.as_seq()) {
                        (Value::Global(Global::TiktokenEncoding), Some([])) => {
                            self.push(Value::Object(Rc::new(Object {
                                class: Global::TiktokenEncoding,
                                state: None,
                            })))?
                        }
                        _ => {
                            return self.err(format!(
                                "NEWOBJ of a {} (only tiktoken.core.Encoding)",
                                cls.kind()
                            ));
                        }
                    }
                }
                op::BUILD => {
                    let state = self.pop()?;
                    if state.depth() + 1 > MAX_DEPTH {
                        return self.err(format!("values nest deeper than {MAX_DEPTH}"));
                    }
                    let (at, torch) = (self.at, self.allow == Allow::Torch);
                    match self.top_mut()? {
                        Value::Object(o) if o.state.is_none() => {
                            Rc::make_mut(o).state = Some(state)
                        }
                        // torch sets `_metadata` on a state dict's OrderedDict; it is not needed.
                        Value::Dict(_) if torch => {}
                        other => {
                            return Err(PickleError {
                                offset: at,
                                msg: format!("BUILD on a {}", other.kind()),
                            });
                        }
                    }
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.push(v)?;
                }
                other => {
                    return self.err(format!("opcode {other:#04x} is outside the subset read (torch.save / tiktoken pickles)"));
                }
            }
        }
    }
}
