//! PyTorch's checkpoint container (torch.save since 1.6): a zip archive whose entries are
//! `<name>/data.pkl` (the pickled object, storages as persistent ids), `<name>/data/<key>` (raw
//! little-endian storage bytes), `<name>/byteorder` and `<name>/version`.
//!
//! Reading is bounded by the file size: entries must be stored uncompressed (as torch.save
//! writes them) and no larger than the file, every storage must hold exactly the bytes its
//! persistent id declares, and the tensors materialised from one file may not add up to more
//! elements than the file has bytes (views of one storage are possible, broadcasts are not).
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use super::pickle::{self, Allow, StorageRef, TensorRef, TorchDtype, Value};
use crate::checkpoint::write_atomic_with;
use crate::error::{ModelError, Result};

/// Storage data is aligned in the archive so torch.load(mmap=True) can map it.
const STORAGE_ALIGNMENT: u16 = 64;

fn pt_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.to_path_buf(), msg: msg.into() }
}

/// An open torch checkpoint: its archive, from which tensors are read on demand.
pub struct PtFile {
    path: PathBuf,
    zip: ZipArchive<BufReader<File>>,
    /// `<name>/` (the directory every entry sits in).
    prefix: String,
    file_len: u64,
    /// Elements that materialising tensors may still produce.
    budget: u64,
}

impl std::fmt::Debug for PtFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PtFile({})", self.path.display())
    }
}

/// Open a torch checkpoint and unpickle its root object.
pub fn open(path: &Path) -> Result<(PtFile, Value)> {
    let mut file = File::open(path).map_err(|e| pt_err(path, format!("opening: {e}")))?;
    let file_len = file.metadata().map_err(|e| pt_err(path, e.to_string()))?.len();
    let mut magic = [0u8; 4];
    let got = file.read(&mut magic).map_err(|e| pt_err(path, format!("reading: {e}")))?;
    if got < 4 || &magic != b"PK\x03\x04" {
        return Err(pt_err(
            path,
            if got >= 2 && magic[0] == 0x80 {
                "a legacy (pre-1.6, non-zip) torch.save file; re-save it with a current torch"
            } else {
                "not a zip archive: wrong magic (PyTorch checkpoints are zip files starting with PK)"
            },
        ));
    }
    let zip = ZipArchive::new(BufReader::new(file))
        .map_err(|e| pt_err(path, format!("not a readable zip archive: {e}")))?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .collect();
    let prefix = match pickles.as_slice() {
        [one] => one.trim_end_matches("data.pkl").to_string(),
        [] => return Err(pt_err(path, "no data.pkl in the archive: not a torch.save file")),
        _ => {
            return Err(pt_err(path, format!("{} data.pkl entries in the archive", pickles.len())));
        }
    };
    let mut pt = PtFile { path: path.to_path_buf(), zip, prefix, file_len, budget: file_len };
    if pt.zip.index_for_name(&format!("{}byteorder", pt.prefix)).is_some() {
        let order = pt.read_entry("byteorder")?;
        if order != b"little" {
            return Err(pt_err(
                path,
                format!(
                    "byte order {:?}: only little-endian checkpoints are read",
                    String::from_utf8_lossy(&order)
                ),
            ));
        }
    }
    let bytes = pt.read_entry("data.pkl")?;
    let root = pickle::unpickle(&bytes, Allow::Torch).map_err(|e| ModelError::Pickle {
        path: path.to_path_buf(),
        entry: format!("{}data.pkl", pt.prefix),
        offset: e.offset,
        msg: e.msg,
    })?;
    Ok((pt, root))
}

impl PtFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bytes of `<prefix><name>`, refusing compressed entries and sizes past the file's.
    fn read_entry(&mut self, name: &str) -> Result<Vec<u8>> {
        let full = format!("{}{name}", self.prefix);
        let path = self.path.clone();
        let mut f =
            self.zip.by_name(&full).map_err(|e| pt_err(&path, format!("entry {full}: {e}")))?;
        if f.compression() != CompressionMethod::Stored {
            return Err(pt_err(
                &path,
                format!(
                    "entry {full} is compressed ({}); torch.save stores entries uncompressed",
                    f.compression()
                ),
            ));
        }
        let size = f.size();
        if size > self.file_len {
            return Err(pt_err(
                &path,
                format!(
                    "entry {full} declares {size} bytes, more than the whole file ({})",
                    self.file_len
                ),
            ));
        }
        let mut buf = Vec::new();
        buf.try_reserve_exact(size as usize)
            .map_err(|e| pt_err(&path, format!("entry {full}: {e}")))?;
        // One byte past the declared size lets the reader reach the entry's end, where the zip
        // reader checks the CRC; a longer entry is caught by the length check.
        (&mut f)
            .take(size + 1)
            .read_to_end(&mut buf)
            .map_err(|e| pt_err(&path, format!("entry {full}: {e}")))?;
        if buf.len() as u64 != size {
            return Err(pt_err(
                &path,
                format!("entry {full} holds {} bytes, declares {size}", buf.len()),
            ));
        }
        Ok(buf)
    }

    /// Raw bytes of a storage, checked against the size its persistent id declares.
    fn storage(&mut self, s: &StorageRef) -> Result<Vec<u8>> {
        let bytes = self.read_entry(&format!("data/{}", s.key))?;
        let want = s.numel.checked_mul(s.dtype.size() as u64);
        if want != Some(bytes.len() as u64) {
            return Err(pt_err(
                &self.path,
                format!(
                    "storage `{}` declares {} {:?} elements but data/{} holds {} bytes",
                    s.key,
                    s.numel,
                    s.dtype,
                    s.key,
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    /// The elements of `t` in row-major order, each converted by `conv` from its raw bytes.
    fn gather<T>(
        &mut self,
        t: &TensorRef,
        what: &str,
        conv: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<T>> {
        let n = t.numel();
        if n > self.budget {
            return Err(pt_err(
                &self.path,
                format!(
                    "`{what}`: its tensors read more elements than the file has bytes ({})",
                    self.file_len
                ),
            ));
        }
        self.budget -= n;
        let bytes = self.storage(&t.storage)?;
        let es = t.storage.dtype.size();
        let (shape, stride) = (&t.shape, &t.stride);
        let mut out = Vec::with_capacity(n as usize);
        let mut idx = vec![0u64; shape.len()];
        let mut lin = t.offset;
        for _ in 0..n {
            // In range: `TensorRef` checked every view against its storage's numel, and the
            // storage holds exactly numel elements.
            let at = lin as usize * es;
            let raw = bytes.get(at..at + es).ok_or_else(|| {
                pt_err(&self.path, format!("`{what}`: element {lin} outside its storage"))
            })?;
            out.push(conv(raw));
            for d in (0..shape.len()).rev() {
                idx[d] += 1;
                lin += stride[d];
                if idx[d] < shape[d] {
                    break;
                }
                lin -= stride[d] * shape[d];
                idx[d] = 0;
            }
        }
        Ok(out)
    }

    /// A floating-point tensor widened to f32 (f64 narrowed), with its shape.
    pub fn f32s(&mut self, t: &TensorRef, what: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let conv: fn(&[u8]) -> f32 = match t.storage.dtype {
            TorchDtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            TorchDtype::BF16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            TorchDtype::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            TorchDtype::F64 => {
                |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }
            other => {
                return Err(ModelError::Dtype {
                    path: self.path.clone(),
                    name: what.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let shape = t.shape.iter().map(|&d| d as usize).collect();
        Ok((shape, self.gather(t, what, conv)?))
    }

    /// An integer tensor as i64.
    pub fn i64s(&mut self, t: &TensorRef, what: &str) -> Result<Vec<i64>> {
        let conv: fn(&[u8]) -> i64 = match t.storage.dtype {
            TorchDtype::I64 => {
                |b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }
            TorchDtype::I32 => |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            TorchDtype::I16 => |b| i16::from_le_bytes([b[0], b[1]]) as i64,
            TorchDtype::I8 => |b| b[0] as i8 as i64,
            TorchDtype::U8 | TorchDtype::Bool => |b| b[0] as i64,
            other => {
                return Err(pt_err(
                    &self.path,
                    format!("`{what}` has dtype {other:?}, expected an integer tensor"),
                ));
            }
        };
        self.gather(t, what, conv)
    }
}

/// A tensor to write: f32 or i32 data, row-major, with its shape.
pub enum Data<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
}

/// Writes a torch checkpoint: storages first (one per tensor), then the pickle.
pub struct PtWriter<'f> {
    zip: ZipWriter<BufWriter<&'f mut File>>,
    prefix: String,
    next_key: usize,
}

/// Write `path` (atomically) as a torch.save archive named after the file stem; `build` adds
/// tensors and returns the pickle of the root object.
pub fn write(
    path: &Path,
    build: impl FnOnce(&mut PtWriter) -> std::io::Result<Vec<u8>>,
) -> Result<()> {
    let stem = path.file_stem().map_or("archive".into(), |s| s.to_string_lossy().into_owned());
    write_atomic_with(path, |file| {
        let mut w = PtWriter {
            zip: ZipWriter::new(BufWriter::new(file)),
            prefix: format!("{stem}/"),
            next_key: 0,
        };
        let pickle = build(&mut w)?;
        w.entry("data.pkl", &pickle, 1)?;
        w.entry(".format_version", b"1", 1)?;
        w.entry(".storage_alignment", STORAGE_ALIGNMENT.to_string().as_bytes(), 1)?;
        w.entry("byteorder", b"little", 1)?;
        w.entry("version", b"3\n", 1)?;
        let mut inner = w.zip.finish().map_err(std::io::Error::other)?;
        inner.flush()
    })
}

impl PtWriter<'_> {
    fn entry(&mut self, name: &str, bytes: &[u8], align: u16) -> std::io::Result<()> {
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .large_file(bytes.len() as u64 >= u32::MAX as u64)
            .with_alignment(align);
        self.zip
            .start_file(format!("{}{name}", self.prefix), options)
            .map_err(std::io::Error::other)?;
        self.zip.write_all(bytes)
    }

    /// Store `data` in a new storage and return a contiguous tensor of `shape` over it.
    pub fn tensor(&mut self, shape: &[usize], data: Data) -> std::io::Result<TensorRef> {
        let (dtype, bytes): (TorchDtype, Vec<u8>) = match data {
            Data::F32(x) => (TorchDtype::F32, x.iter().flat_map(|v| v.to_le_bytes()).collect()),
            Data::I32(x) => (TorchDtype::I32, x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        };
        let numel = (bytes.len() / dtype.size()) as u64;
        if shape.iter().product::<usize>() as u64 != numel {
            return Err(std::io::Error::other(format!(
                "shape {shape:?} does not hold {numel} elements"
            )));
        }
        let key = self.next_key.to_string();
        self.next_key += 1;
        self.entry(&format!("data/{key}"), &bytes, STORAGE_ALIGNMENT)?;
        // Row-major strides.
        let mut stride = vec![1u64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1] as u64;
        }
        Ok(TensorRef {
            storage: StorageRef { dtype, key, numel },
            offset: 0,
            shape: shape.iter().map(|&d| d as u64).collect(),
            stride,
        })
    }
}
