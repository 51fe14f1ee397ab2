//! A pickle interpreter that builds data and never calls code.
//!
//! Objects live in one arena (`Parsed::objs`) and refer to each other by index, so memo
//! sharing and cycles cost nothing and everything is freed at once. Globals resolve only
//! against an allow-list; "calling" one of them (REDUCE, NEWOBJ) builds a value this module
//! defines — a tensor description, an empty dict, or an opaque placeholder.

use super::cursor::Cursor;
use super::dtype::TorchDType;
use std::collections::HashMap;

pub(super) type Id = u32;

/// Most objects one pickle may create (a Stable Diffusion pickle makes ~100k).
const MAX_OBJECTS: usize = 8_000_000;
/// Most ids held by the stack and all containers together.
const MAX_ITEMS: usize = 32_000_000;
const MAX_STACK: usize = 1_000_000;
/// torch.save nests MARKs about four deep.
const MAX_MARKS: usize = 1_000;
const MAX_LINE: usize = 512;
const MAX_KEY: usize = 256;
/// No allow-listed callable takes more arguments than this.
const MAX_ARGS: usize = 16;
const MAX_NDIM: usize = 64;

/// An unpickled value.
#[derive(Debug)]
pub(super) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits; kept only as a placeholder.
    BigInt,
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set,
    Global(Global),
    Storage(Box<StorageRef>),
    Tensor(Box<TensorMeta>),
    /// A harmless object we do not model (numpy scalar, torch.device, ...).
    Opaque(&'static str),
}

impl Obj {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) | Obj::BigInt => "int",
            Obj::Float => "float",
            Obj::Str(_) => "str",
            Obj::Bytes => "bytes",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Set => "set",
            Obj::Global(_) => "global",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
            Obj::Opaque(name) => name,
        }
    }
}

/// An allow-listed global.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Global {
    OrderedDict,
    /// `torch._utils._rebuild_tensor{,_v2,_v3}`.
    RebuildTensor(u8),
    /// `_rebuild_parameter{,_with_state}`: returns its first argument.
    RebuildParameter,
    /// `torch._tensor._rebuild_from_type_v2(func, type, args, state)`.
    RebuildFromType,
    /// `torch.Tensor` or `torch.nn.Parameter` as a type.
    TensorClass,
    TorchSize,
    StorageType(TorchDType),
    UntypedStorage,
    DType(TorchDType),
    CodecsEncode,
    SetType,
    /// Something harmless whose result we keep as a placeholder.
    Opaque(&'static str),
}

/// The `persistent_load` result: a storage record and its element type.
#[derive(Debug)]
pub(super) struct StorageRef {
    key: String,
    dtype: TorchDType,
    numel: u64,
}

/// A tensor as `_rebuild_tensor_v2/v3` describes it; not yet checked against the archive.
#[derive(Debug)]
pub(super) struct TensorMeta {
    pub storage_key: String,
    /// Elements of the storage's own type (bytes for an untyped storage).
    pub storage_numel: u64,
    pub storage_dtype: TorchDType,
    pub dtype: TorchDType,
    /// In elements of `dtype`.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// The object arena and the object STOP returned.
pub(super) struct Parsed {
    objs: Vec<Obj>,
    pub root: Id,
}

impl Parsed {
    pub(super) fn get(&self, id: Id) -> &Obj {
        // Ids only come from `Machine::alloc`, so they are always in range.
        &self.objs[id as usize]
    }
}

/// Resolves `module.name` against the allow-list.
fn resolve(module: &str, name: &str) -> Result<Global, String> {
    // Old torch saved CUDA tensors with `torch.cuda.<Name>Storage`.
    if let ("torch" | "torch.cuda", Some(dtype)) = (module, TorchDType::from_storage_name(name)) {
        return Ok(Global::StorageType(dtype));
    }
    if let ("torch", Some(dtype)) = (module, TorchDType::from_torch_name(name)) {
        return Ok(Global::DType(dtype));
    }
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor(1),
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor(2),
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensor(3),
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Global::RebuildParameter
        }
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromType,
        ("torch" | "torch._tensor", "Tensor")
        | ("torch.nn.parameter" | "torch.nn", "Parameter" | "Buffer") => Global::TensorClass,
        ("torch", "Size") => Global::TorchSize,
        ("torch", "device") => Global::Opaque("torch.device"),
        ("torch" | "torch.storage", "UntypedStorage") => Global::UntypedStorage,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("builtins" | "__builtin__", "set" | "frozenset") => Global::SetType,
        ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar") => {
            Global::Opaque("numpy scalar")
        }
        ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct")
        | ("numpy", "ndarray") => Global::Opaque("numpy array"),
        ("numpy", "dtype") => Global::Opaque("numpy dtype"),
        // Full Stable Diffusion 1.x training checkpoints keep this class as a dict key.
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") => {
            Global::Opaque("ModelCheckpoint")
        }
        (
            "torch._utils",
            "_rebuild_qtensor"
            | "_rebuild_sparse_tensor"
            | "_rebuild_nested_tensor"
            | "_rebuild_meta_tensor_no_storage"
            | "_rebuild_wrapper_subclass"
            | "_rebuild_device_tensor_from_numpy"
            | "_rebuild_xla_tensor"
            | "_rebuild_mps_tensor",
        ) => {
            return Err(format!(
                "`torch._utils.{name}` rebuilds a quantized, sparse, nested, meta or \
                 device-specific tensor, which this reader does not support; save dense \
                 CPU tensors instead"
            ))
        }
        _ => {
            return Err(format!(
                "refusing to load `{}.{}`: the file tries to run code; it is not a plain \
                 PyTorch checkpoint",
                shorten(module),
                shorten(name)
            ))
        }
    })
}

fn shorten(s: &str) -> String {
    let short: String = s.chars().take(120).collect();
    short.escape_debug().to_string()
}

/// Runs the pickle in `data` to its STOP opcode.
pub(super) fn parse(data: &[u8]) -> Result<Parsed, String> {
    let mut m = Machine {
        input: Cursor::at(data, 0),
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        items: 0,
    };
    // Shared constants, so NONE/NEWTRUE/NEWFALSE allocate nothing.
    for constant in [Obj::None, Obj::Bool(false), Obj::Bool(true)] {
        m.objs.push(constant);
    }
    loop {
        let at = m.input.pos;
        let op = m
            .input
            .u8()
            .ok_or("the pickle ends without a STOP opcode: the file is truncated")?;
        match m.step(op) {
            Ok(Some(root)) => {
                return Ok(Parsed { objs: m.objs, root });
            }
            Ok(None) => {}
            Err(e) => return Err(format!("{e} (pickle byte {at})")),
        }
    }
}

const NONE: Id = 0;
const FALSE: Id = 1;
const TRUE: Id = 2;

struct Machine<'a> {
    input: Cursor<'a>,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    /// Ids held by containers, for `MAX_ITEMS`.
    items: usize,
}

impl Machine<'_> {
    /// Executes one opcode; `Some(root)` at STOP.
    fn step(&mut self, op: u8) -> Result<Option<Id>, String> {
        match op {
            0x80 => {
                // PROTO
                let version = self.byte()?;
                if version > 5 {
                    return Err(format!("unknown pickle protocol {version}"));
                }
            }
            0x95 => {
                // FRAME: only a read-ahead hint.
                self.bytes(8)?;
            }
            b'.' => return self.pop().map(Some),
            b'(' => {
                if self.marks.len() >= MAX_MARKS {
                    return Err(format!(
                        "the pickle nests MARKs more than {MAX_MARKS} deep, which no \
                         checkpoint does"
                    ));
                }
                self.marks.push(self.stack.len());
            }
            b'0' => {
                // POP: with nothing above the mark, Python pops the mark itself.
                if self.stack.len() > self.base() {
                    self.pop()?;
                } else {
                    self.pop_mark()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = self.top()?;
                self.push(top)?;
            }
            b'N' => self.push(NONE)?,
            0x88 => self.push(TRUE)?,
            0x89 => self.push(FALSE)?,
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.new_obj(Obj::Int(v.into()))?;
            }
            b'K' => {
                let v = self.byte()?;
                self.new_obj(Obj::Int(v.into()))?;
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.new_obj(Obj::Int(v.into()))?;
            }
            0x8a => {
                let len = self.byte()? as usize;
                let value = long(self.bytes(len)?);
                self.new_obj(value)?;
            }
            0x8b => {
                let len = self.len32()?;
                let value = long(self.bytes(len)?);
                self.new_obj(value)?;
            }
            b'G' => {
                self.array::<8>()?;
                self.new_obj(Obj::Float)?;
            }
            b'X' => {
                let len = self.len32()?;
                self.string(len)?;
            }
            0x8c => {
                let len = self.byte()? as usize;
                self.string(len)?;
            }
            0x8d => {
                let len = self.len64()?;
                self.string(len)?;
            }
            // Python 2 `str`: bytes that Python 3 decodes as ASCII by default.
            b'T' => {
                let len = self.len32()?;
                self.py2_string(len)?;
            }
            b'U' => {
                let len = self.byte()? as usize;
                self.py2_string(len)?;
            }
            b'B' => {
                let len = self.len32()?;
                self.bytes(len)?;
                self.new_obj(Obj::Bytes)?;
            }
            b'C' => {
                let len = self.byte()? as usize;
                self.bytes(len)?;
                self.new_obj(Obj::Bytes)?;
            }
            0x8e | 0x96 => {
                let len = self.len64()?;
                self.bytes(len)?;
                self.new_obj(Obj::Bytes)?;
            }
            b')' => self.new_obj(Obj::Tuple(Vec::new()))?,
            b't' => {
                let items = self.pop_mark()?;
                self.new_container(Obj::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let items = self.pop_n(n)?;
                self.new_container(Obj::Tuple(items))?;
            }
            b']' => self.new_obj(Obj::List(Vec::new()))?,
            b'l' => {
                let items = self.pop_mark()?;
                self.new_container(Obj::List(items))?;
            }
            b'a' => {
                let value = self.pop()?;
                self.extend_list(vec![value])?;
            }
            b'e' => {
                let values = self.pop_mark()?;
                self.extend_list(values)?;
            }
            b'}' => self.new_obj(Obj::Dict(Vec::new()))?,
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.new_obj(Obj::Dict(Vec::new()))?;
                self.extend_dict(pairs)?;
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.extend_dict(vec![(key, value)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.extend_dict(pairs)?;
            }
            0x8f => self.new_obj(Obj::Set)?,
            0x90 => {
                self.pop_mark()?;
                let target = self.top()?;
                if !matches!(self.obj(target), Obj::Set) {
                    return Err(format!("ADDITEMS on a {}", self.obj(target).kind()));
                }
            }
            0x91 => {
                self.pop_mark()?;
                self.new_obj(Obj::Set)?;
            }
            b'q' => {
                let index = self.byte()?.into();
                self.memo_put(index)?;
            }
            b'r' => {
                let index = u32::from_le_bytes(self.array()?);
                self.memo_put(index)?;
            }
            0x94 => {
                let index = u32::try_from(self.memo.len()).map_err(|_| "memo is full")?;
                self.memo_put(index)?;
            }
            b'h' => {
                let index = self.byte()?.into();
                self.memo_get(index)?;
            }
            b'j' => {
                let index = u32::from_le_bytes(self.array()?);
                self.memo_get(index)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let global = resolve(&module, &name)?;
                self.new_obj(Obj::Global(global))?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Obj::Str(module), Obj::Str(name)) = (self.obj(module), self.obj(name)) else {
                    return Err("STACK_GLOBAL needs two strings".into());
                };
                let global = resolve(module, name)?;
                self.new_obj(Obj::Global(global))?;
            }
            b'i' => {
                // INST: module and name inline, arguments since the mark.
                let module = self.line()?;
                let name = self.line()?;
                let global = resolve(&module, &name)?;
                let args = self.pop_mark()?;
                let result = self.call(global, &args)?;
                self.push(result)?;
            }
            b'o' => {
                // OBJ: class and arguments since the mark.
                let mut items = self.pop_mark()?.into_iter();
                let class = items.next().ok_or("OBJ without a class")?;
                let args: Vec<Id> = items.collect();
                let global = self.global(class)?;
                let result = self.call(global, &args)?;
                self.push(result)?;
            }
            b'R' => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let global = self.global(callable)?;
                let args = self.call_args(args)?;
                let result = self.call(global, &args)?;
                self.push(result)?;
            }
            0x81 | 0x92 => {
                // NEWOBJ / NEWOBJ_EX: `cls.__new__(cls, *args)`; keyword arguments ignored.
                if op == 0x92 {
                    self.pop()?;
                }
                let args = self.pop()?;
                let class = self.pop()?;
                let global = self.global(class)?;
                let args = self.call_args(args)?;
                let result = match global {
                    Global::OrderedDict => self.alloc(Obj::Dict(Vec::new()))?,
                    Global::SetType => self.alloc(Obj::Set)?,
                    _ => self.call(global, &args)?,
                };
                self.push(result)?;
            }
            b'b' => {
                // BUILD sets an object's attributes; the state of what we keep is irrelevant.
                let _state = self.pop()?;
                let target = self.top()?;
                match self.obj(target) {
                    Obj::Dict(_) | Obj::Opaque(_) | Obj::Tensor(_) | Obj::Set | Obj::List(_) => {}
                    other => return Err(format!("BUILD on a {}", other.kind())),
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = self.persistent_load(pid)?;
                self.new_obj(Obj::Storage(Box::new(storage)))?;
            }
            other => {
                return Err(format!(
                    "unsupported pickle opcode {} (0x{other:02x}); torch.save does not \
                     write it",
                    opcode_name(other)
                ))
            }
        }
        Ok(None)
    }

    fn obj(&self, id: Id) -> &Obj {
        &self.objs[id as usize]
    }

    fn alloc(&mut self, obj: Obj) -> Result<Id, String> {
        if self.objs.len() >= MAX_OBJECTS {
            return Err(format!(
                "the pickle creates more than {MAX_OBJECTS} objects"
            ));
        }
        let id = self.objs.len() as Id;
        self.objs.push(obj);
        Ok(id)
    }

    fn new_obj(&mut self, obj: Obj) -> Result<(), String> {
        let id = self.alloc(obj)?;
        self.push(id)
    }

    fn new_container(&mut self, obj: Obj) -> Result<(), String> {
        let len = match &obj {
            Obj::Tuple(v) | Obj::List(v) => v.len(),
            _ => 0,
        };
        self.count_items(len)?;
        self.new_obj(obj)
    }

    fn count_items(&mut self, n: usize) -> Result<(), String> {
        self.items = self.items.saturating_add(n);
        if self.items > MAX_ITEMS {
            return Err(format!(
                "the pickle's containers hold more than {MAX_ITEMS} items"
            ));
        }
        Ok(())
    }

    fn push(&mut self, id: Id) -> Result<(), String> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("the pickle stack grows past {MAX_STACK} entries"));
        }
        self.stack.push(id);
        Ok(())
    }

    /// Stack length at the innermost open MARK; nothing below it can be popped.
    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id, String> {
        if self.stack.len() <= self.base() {
            return Err("the pickle pops an empty stack".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "the pickle pops an empty stack".into())
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Id>, String> {
        let len = self.stack.len();
        if len < self.base() + n {
            return Err("the pickle pops an empty stack".into());
        }
        Ok(self.stack.split_off(len - n))
    }

    fn top(&self) -> Result<Id, String> {
        if self.stack.len() <= self.base() {
            return Err("the pickle reads an empty stack".into());
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| "the pickle reads an empty stack".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let mark = self
            .marks
            .pop()
            .ok_or("the pickle closes a MARK it never opened")?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn byte(&mut self) -> Result<u8, String> {
        self.input.u8().ok_or_else(truncated)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        self.input.array().ok_or_else(truncated)
    }

    fn bytes(&mut self, len: usize) -> Result<&[u8], String> {
        if len > self.input.remaining() {
            return Err(format!(
                "the pickle declares a {len}-byte value but only {} bytes remain: the file \
                 is truncated or corrupt",
                self.input.remaining()
            ));
        }
        self.input.take(len).ok_or_else(truncated)
    }

    fn len32(&mut self) -> Result<usize, String> {
        let len = i32::from_le_bytes(self.array()?);
        usize::try_from(len).map_err(|_| format!("negative length {len}"))
    }

    fn len64(&mut self) -> Result<usize, String> {
        let len = u64::from_le_bytes(self.array()?);
        usize::try_from(len).map_err(|_| format!("length {len} is too large"))
    }

    /// A unicode string. Invalid UTF-8 is refused as Python refuses it: replacing bytes
    /// would let a string take three times the bytes the file spent on it.
    fn string(&mut self, len: usize) -> Result<(), String> {
        let bytes = self.bytes(len)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|e| {
                format!(
                    "the pickle holds a {len}-byte string that is not UTF-8 (at byte {}): \
                     the file is corrupt",
                    e.valid_up_to()
                )
            })?
            .to_owned();
        self.new_obj(Obj::Str(s))
    }

    /// A Python 2 string: kept as a string when it is UTF-8 (ASCII names), else as bytes.
    fn py2_string(&mut self, len: usize) -> Result<(), String> {
        let obj = match std::str::from_utf8(self.bytes(len)?) {
            Ok(s) => Obj::Str(s.to_owned()),
            Err(_) => Obj::Bytes,
        };
        self.new_obj(obj)
    }

    /// A newline-terminated GLOBAL/INST argument.
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.input.data[self.input.pos.min(self.input.data.len())..];
        let end = rest
            .iter()
            .take(MAX_LINE)
            .position(|&b| b == b'\n')
            .ok_or("a GLOBAL name is unterminated or too long")?;
        let line = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.input.skip(end + 1).ok_or_else(truncated)?;
        Ok(line)
    }

    fn memo_put(&mut self, index: u32) -> Result<(), String> {
        let top = self.top()?;
        if self.memo.len() >= MAX_OBJECTS && !self.memo.contains_key(&index) {
            return Err(format!(
                "the pickle memoizes more than {MAX_OBJECTS} objects"
            ));
        }
        self.memo.insert(index, top);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<(), String> {
        let id = *self
            .memo
            .get(&index)
            .ok_or_else(|| format!("the pickle reads memo slot {index}, which it never set"))?;
        self.push(id)
    }

    fn global(&self, id: Id) -> Result<Global, String> {
        match self.obj(id) {
            Obj::Global(g) => Ok(*g),
            other => Err(format!(
                "the pickle calls a {}, which is not callable",
                other.kind()
            )),
        }
    }

    /// The arguments of a REDUCE/NEWOBJ, refusing long tuples before copying them.
    fn call_args(&self, id: Id) -> Result<Vec<Id>, String> {
        let args = self.tuple(id, "call arguments")?;
        if args.len() > MAX_ARGS {
            return Err(format!("a call passes {} arguments", args.len()));
        }
        Ok(args.to_vec())
    }

    fn tuple(&self, id: Id, what: &str) -> Result<&[Id], String> {
        match self.obj(id) {
            Obj::Tuple(items) => Ok(items),
            other => Err(format!("{what} are a {}, not a tuple", other.kind())),
        }
    }

    fn extend_list(&mut self, values: Vec<Id>) -> Result<(), String> {
        self.count_items(values.len())?;
        let target = self.top()?;
        match &mut self.objs[target as usize] {
            Obj::List(items) => {
                items.extend(values);
                Ok(())
            }
            // `set.__setstate__`-style appends onto placeholders are harmless.
            Obj::Set | Obj::Opaque(_) => Ok(()),
            other => Err(format!("APPEND to a {}", other.kind())),
        }
    }

    fn extend_dict(&mut self, pairs: Vec<(Id, Id)>) -> Result<(), String> {
        self.count_items(pairs.len().saturating_mul(2))?;
        let target = self.top()?;
        match &mut self.objs[target as usize] {
            Obj::Dict(items) => {
                items.extend(pairs);
                Ok(())
            }
            Obj::Opaque(_) => Ok(()),
            other => Err(format!("SETITEM on a {}", other.kind())),
        }
    }

    fn int(&self, id: Id, what: &str) -> Result<u64, String> {
        match self.obj(id) {
            Obj::Int(v) => u64::try_from(*v).map_err(|_| format!("{what} is negative ({v})")),
            Obj::Bool(b) => Ok(u64::from(*b)),
            other => Err(format!("{what} is a {}, not an int", other.kind())),
        }
    }

    fn ints(&self, id: Id, what: &str) -> Result<Vec<u64>, String> {
        let items = match self.obj(id) {
            Obj::Tuple(items) | Obj::List(items) => items,
            other => return Err(format!("{what} is a {}, not a tuple", other.kind())),
        };
        if items.len() > MAX_NDIM {
            return Err(format!("{what} has {} dimensions", items.len()));
        }
        items.iter().map(|&i| self.int(i, what)).collect()
    }

    /// `persistent_load(('storage', storage_type, key, location, numel))`.
    fn persistent_load(&self, pid: Id) -> Result<StorageRef, String> {
        let bad = || {
            "a persistent id is not ('storage', type, key, location, numel): this is not \
             a torch.save file"
                .to_string()
        };
        let [tag, kind, key, _location, numel] = self.tuple(pid, "persistent id")? else {
            return Err(bad());
        };
        if !matches!(self.obj(*tag), Obj::Str(s) if s == "storage") {
            return Err(bad());
        }
        let dtype = match self.obj(*kind) {
            Obj::Global(Global::StorageType(d)) => *d,
            Obj::Global(Global::UntypedStorage) => TorchDType::U8,
            _ => return Err(bad()),
        };
        let Obj::Str(key) = self.obj(*key) else {
            return Err(bad());
        };
        // torch names storages 0, 1, 2...; a long key would be copied into every tensor.
        if key.len() > MAX_KEY {
            return Err(format!("a storage key is longer than {MAX_KEY} bytes"));
        }
        Ok(StorageRef {
            key: key.clone(),
            dtype,
            numel: self.int(*numel, "a storage size")?,
        })
    }

    /// What "calling" an allow-listed global builds. Nothing is executed.
    fn call(&mut self, global: Global, args: &[Id]) -> Result<Id, String> {
        match global {
            Global::OrderedDict => {
                let pairs = match args {
                    [] => Vec::new(),
                    [items] => match self.obj(*items) {
                        Obj::List(v) | Obj::Tuple(v) => {
                            let mut out = Vec::with_capacity(v.len());
                            for &pair in v {
                                match self.obj(pair) {
                                    Obj::Tuple(kv) | Obj::List(kv) if kv.len() == 2 => {
                                        out.push((kv[0], kv[1]));
                                    }
                                    _ => return Err("OrderedDict items are not pairs".into()),
                                }
                            }
                            out
                        }
                        other => {
                            return Err(format!("OrderedDict from a {}", other.kind()));
                        }
                    },
                    _ => return Err("OrderedDict takes at most one argument".into()),
                };
                self.count_items(pairs.len().saturating_mul(2))?;
                self.alloc(Obj::Dict(pairs))
            }
            Global::RebuildTensor(version) => {
                let meta = self.rebuild_tensor(version, args)?;
                self.alloc(Obj::Tensor(Box::new(meta)))
            }
            Global::RebuildParameter | Global::TensorClass => match args.first() {
                Some(&data) if matches!(self.obj(data), Obj::Tensor(_)) => Ok(data),
                _ => Err("a Parameter is rebuilt from something other than a tensor".into()),
            },
            Global::RebuildFromType => {
                let [func, class, func_args, _state] = args else {
                    return Err("_rebuild_from_type_v2 takes four arguments".into());
                };
                let func = self.global(*func)?;
                if !matches!(func, Global::RebuildTensor(_))
                    || self.global(*class)? != Global::TensorClass
                {
                    return Err("_rebuild_from_type_v2 rebuilds something that is not a \
                                plain tensor or Parameter"
                        .into());
                }
                let func_args = self.call_args(*func_args)?;
                self.call(func, &func_args)
            }
            Global::TorchSize => match args {
                [] => self.alloc(Obj::Tuple(Vec::new())),
                [dims] => Ok(*dims),
                _ => Err("torch.Size takes one argument".into()),
            },
            Global::CodecsEncode => self.alloc(Obj::Bytes),
            Global::SetType => self.alloc(Obj::Set),
            Global::Opaque(name) => self.alloc(Obj::Opaque(name)),
            Global::StorageType(_) | Global::UntypedStorage | Global::DType(_) => {
                Err("the pickle calls a storage type or dtype, which torch.save never does".into())
            }
        }
    }

    /// `_rebuild_tensor(storage, offset, size, stride)`, `_v2(..., requires_grad,
    /// hooks[, metadata])`, `_v3(..., requires_grad, hooks, dtype[, metadata])`.
    fn rebuild_tensor(&self, version: u8, args: &[Id]) -> Result<TensorMeta, String> {
        let arity = match version {
            1 => 4..=4,
            2 => 6..=7,
            _ => 7..=8,
        };
        if !arity.contains(&args.len()) {
            return Err(format!(
                "a tensor is rebuilt with {} arguments instead of {}",
                args.len(),
                arity.start()
            ));
        }
        let Obj::Storage(storage) = self.obj(args[0]) else {
            return Err(format!(
                "a tensor is rebuilt from a {}, not a storage",
                self.obj(args[0]).kind()
            ));
        };
        let dtype = if version == 3 {
            match self.obj(args[6]) {
                Obj::Global(Global::DType(d)) => *d,
                other => return Err(format!("a tensor's dtype is a {}", other.kind())),
            }
        } else {
            storage.dtype
        };
        let shape = self.ints(args[2], "a tensor shape")?;
        let stride = self.ints(args[3], "a tensor stride")?;
        if shape.len() != stride.len() {
            return Err(format!(
                "a tensor has {} sizes but {} strides",
                shape.len(),
                stride.len()
            ));
        }
        Ok(TensorMeta {
            storage_key: storage.key.clone(),
            storage_numel: storage.numel,
            storage_dtype: storage.dtype,
            dtype,
            offset: self.int(args[1], "a storage offset")?,
            shape,
            stride,
        })
    }
}

fn truncated() -> String {
    "the pickle ends in the middle of an opcode: the file is truncated".into()
}

/// A little-endian two's complement integer of any width.
fn long(bytes: &[u8]) -> Obj {
    if bytes.len() > 8 {
        return Obj::BigInt;
    }
    let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
        [0xff; 8]
    } else {
        [0; 8]
    };
    buf[..bytes.len()].copy_from_slice(bytes);
    Obj::Int(i64::from_le_bytes(buf))
}

fn pairs(items: Vec<Id>) -> Result<Vec<(Id, Id)>, String> {
    let chunks = items.chunks_exact(2);
    if !chunks.remainder().is_empty() {
        return Err("a dict is given an odd number of keys and values".into());
    }
    Ok(chunks.map(|kv| (kv[0], kv[1])).collect())
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'P' => "PERSID",
        b'p' => "PUT",
        b'g' => "GET",
        0x82..=0x84 => "EXT",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Parsed, String> {
        parse(bytes)
    }

    #[test]
    fn protocol_2_dict_with_memo_sharing() {
        // {'a': [1, 'x'], 'b': <same list>}
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01X\x01\x00\x00\x00xeX\x01\x00\x00\x00bh\x01u.";
        let parsed = run(p).expect("parses");
        let Obj::Dict(pairs) = parsed.get(parsed.root) else {
            panic!("root is not a dict");
        };
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].1, pairs[1].1, "memo shares the list");
        let Obj::List(items) = parsed.get(pairs[0].1) else {
            panic!("value is not a list");
        };
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn long1_sign_extends() {
        assert!(matches!(long(&[0xff]), Obj::Int(-1)));
        assert!(matches!(long(&[0x00, 0x01]), Obj::Int(256)));
        assert!(matches!(long(&[]), Obj::Int(0)));
        assert!(matches!(long(&[1; 9]), Obj::BigInt));
    }

    #[test]
    fn refuses_globals_outside_the_allow_list() {
        for (module, name) in [
            ("os", "system"),
            ("builtins", "eval"),
            ("subprocess", "Popen"),
        ] {
            let mut p = b"\x80\x02c".to_vec();
            p.extend_from_slice(format!("{module}\n{name}\n.").as_bytes());
            let err = run(&p).err().expect("refused");
            assert!(
                err.contains(&format!("refusing to load `{module}.{name}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn stack_global_is_checked_too() {
        let p = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93.";
        let err = run(p).err().expect("refused");
        assert!(err.contains("`os.system`"), "{err}");
    }

    #[test]
    fn deep_marks_are_refused() {
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b'(', 100_000));
        p.push(b'.');
        let err = run(&p).err().expect("refused");
        assert!(err.contains("MARKs"), "{err}");
    }

    #[test]
    fn lengths_are_checked_against_the_input() {
        let err = run(b"\x80\x02X\xff\xff\xff\x7fabc").err().expect("refused");
        assert!(err.contains("only 3 bytes remain"), "{err}");
        let err = run(b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xffabc")
            .err()
            .expect("refused");
        assert!(
            err.contains("bytes remain") || err.contains("too large"),
            "{err}"
        );
    }

    #[test]
    fn stack_and_memo_misuse_is_an_error() {
        for p in [
            &b"\x80\x02."[..],
            b"\x80\x02h\x05.",
            b"\x80\x02(0R.",
            b"\x80\x02K\x01(s.",
            b"\x80\x021.",
            b"\x80\x02K\x01K\x02R.",
            b"\x80\x02}K\x01a.",
            b"\x80\x02",
        ] {
            assert!(run(p).is_err(), "{p:?}");
        }
    }

    #[test]
    fn self_referencing_dict_parses() {
        // d = {}; d['d'] = d
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00dh\x00s.";
        let parsed = run(p).expect("parses");
        assert!(matches!(parsed.get(parsed.root), Obj::Dict(v) if v.len() == 1));
    }

    #[test]
    fn random_mutations_never_panic() {
        let base: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00actorch._utils\n_rebuild_tensor_v2\nq\x01((X\x07\x00\x00\x00storageq\x02ctorch\nHalfStorage\nq\x03X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x0ctq\x04QK\x00K\x03K\x04\x86K\x04K\x01\x86\x89ccollections\nOrderedDict\n)Rtq\x05RX\x01\x00\x00\x00bh\x01(h\x04QK\x04K\x02\x85K\x01\x85\x89h\x05tRu.";
        assert!(run(base).is_ok());
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut p = base.to_vec();
            for _ in 0..1 + next() % 3 {
                let at = (next() % p.len() as u64) as usize;
                p[at] = next() as u8;
            }
            let _ = run(&p);
        }
    }
}
