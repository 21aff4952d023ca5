//! A bounds-checked reader of GGUF files (the llama.cpp model format).
//!
//! The header, metadata and tensor table are parsed from a memory map with
//! every length checked against the bytes that remain, so a truncated or
//! corrupt file is an error that says where it went wrong, never a panic or
//! a huge allocation. Tensor data stays in the map until a tensor is asked
//! for, and quantized tensors stay quantized.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use attn_nn::{Error, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_DIMS: usize = 4;
const MAX_ARRAY_DEPTH: usize = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Rows of a large tensor converted at a time by [`GgufFile::q8_matrix`]
/// (a multiple of the 16-row groups of [`attn_nn::kernels::q8::Q8Matrix`]).
pub const Q8_CHUNK_ROWS: usize = 4096;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short rendering for listings: arrays show their length only.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 80 => format!("{:?}… ({} bytes)", &s[..s.floor_char_boundary(80)], s.len()),
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} items]", a.len()),
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            other => other.as_u64().map(|v| v.to_string()).unwrap_or_else(|| format!("{other:?}")),
        }
    }
}

/// A GGML tensor type as stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorType(pub u32);

impl TensorType {
    pub fn name(&self) -> String {
        let n = match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            30 => "BF16",
            other => return format!("type{other}"),
        };
        n.to_string()
    }

    /// `(elements per block, bytes per block)`, for the types attn knows.
    pub fn block(&self) -> Option<(u64, u64)> {
        Some(match self.0 {
            0 => (1, 4),
            1 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            9 => (32, 36),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            15 => (256, 292),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 => (1, 8),
            28 => (1, 8),
            30 => (1, 2),
            _ => return None,
        })
    }

    /// The candle type, for the types attn can compute with.
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        Some(match self.0 {
            0 => GgmlDType::F32,
            1 => GgmlDType::F16,
            2 => GgmlDType::Q4_0,
            3 => GgmlDType::Q4_1,
            6 => GgmlDType::Q5_0,
            7 => GgmlDType::Q5_1,
            8 => GgmlDType::Q8_0,
            9 => GgmlDType::Q8_1,
            10 => GgmlDType::Q2K,
            11 => GgmlDType::Q3K,
            12 => GgmlDType::Q4K,
            13 => GgmlDType::Q5K,
            14 => GgmlDType::Q6K,
            15 => GgmlDType::Q8K,
            30 => GgmlDType::BF16,
            _ => return None,
        })
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// Row-major shape (outermost first), as tensors use.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the tensor data section.
    pub data_offset: u64,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> String {
        format!("truncated or corrupt GGUF at byte {}: {what}", self.pos)
    }

    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], String> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(self.err(&format!("{what} needs {n} bytes, {remaining} left")));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(&format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(&format!("{what}: bool byte {b}"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(&format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let item_ty = self.u32(what)?;
                let count = self.u64(what)?;
                // Every item takes at least one byte: a count beyond the
                // remaining bytes is corrupt, and checking it first bounds
                // the allocation.
                let remaining = (self.buf.len() - self.pos) as u64;
                if count > remaining {
                    return Err(self.err(&format!("{what}: array of {count} items in {remaining} bytes")));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_ty, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            other => return Err(self.err(&format!("{what}: unknown value type {other}"))),
        })
    }
}

impl GgufHeader {
    /// Parses the header of a GGUF file held in `buf` (the whole file).
    pub fn parse(buf: &[u8]) -> std::result::Result<Self, String> {
        let mut r = Reader { buf, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(format!("not a GGUF file (magic {:?}, expected \"GGUF\")", String::from_utf8_lossy(magic)));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version} is not supported (2 and 3 are)"));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each entry is at least 8 + 4 bytes (tensor: name len, n_dims, ...).
        let remaining = (buf.len() - r.pos) as u64;
        if n_kv > remaining / 12 || n_tensors > remaining / 24 {
            return Err(format!(
                "header claims {n_kv} metadata entries and {n_tensors} tensors in a file of {} bytes",
                buf.len()
            ));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("type of `{key}`"))?;
            let v = r.value(ty, 0, &format!("value of `{key}`"))?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a,
                _ => return Err(format!("general.alignment {} is not a power of two", v.summary())),
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor #{i}"))?;
            let n_dims = r.u32(&format!("rank of `{name}`"))? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!("tensor `{name}` has rank {n_dims} (1 to {MAX_DIMS} supported)"));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("dims of `{name}`"))?);
            }
            let ty = TensorType(r.u32(&format!("type of `{name}`"))?);
            let offset = r.u64(&format!("offset of `{name}`"))?;
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| format!("tensor `{name}` dims {dims:?} overflow"))?;
            let size = match ty.block() {
                Some((block, bytes)) => {
                    if dims[0] % block != 0 {
                        return Err(format!(
                            "tensor `{name}`: row length {} is not a multiple of the {} block size {block}",
                            dims[0],
                            ty.name()
                        ));
                    }
                    (elements / block).checked_mul(bytes).ok_or_else(|| format!("tensor `{name}` size overflows"))?
                }
                // Unknown types keep a size of 0: listed, but not loadable.
                None => 0,
            };
            if offset % alignment != 0 {
                return Err(format!("tensor `{name}` offset {offset} is not aligned to {alignment}"));
            }
            tensors.push(TensorInfo { name, dims, ty, offset, size });
        }
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (buf.len() as u64).saturating_sub(data_offset);
        for t in &tensors {
            let end = t.offset.checked_add(t.size).ok_or_else(|| format!("tensor `{}` range overflows", t.name))?;
            if end > data_len {
                return Err(format!(
                    "tensor `{}` ends at byte {} of the data section, which has {data_len} bytes (file truncated?)",
                    t.name, end
                ));
            }
        }
        Ok(GgufHeader { version, metadata, tensors, data_offset })
    }

    /// The `general.architecture` value.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get("general.architecture").and_then(|v| v.as_str())
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<memmap2::Mmap>,
    pub header: GgufHeader,
    /// Load matrices as dense f32 instead of their quantized types
    /// (reference numerics for tests; four to eight times the memory).
    pub dequantize: bool,
    /// Compute with candle's kernels instead of attn's fused inference path
    /// (the reference for comparisons).
    pub candle_kernels: bool,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: read-only map; attn never writes to model files while they
        // are loaded.
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(&path, e))?;
        let header = GgufHeader::parse(&mmap).map_err(|e| Error::format(&path, e))?;
        Ok(GgufFile { path, mmap: Arc::new(mmap), header, dequantize: false, candle_kernels: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        // Ranges were checked against the file length when parsing.
        let start = (self.header.data_offset + info.offset) as usize;
        &self.mmap[start..start + info.size as usize]
    }

    /// Tells the kernel that a tensor's bytes are no longer needed in
    /// memory, once converted into a model's own buffers: the file's pages
    /// leave the process's resident set (a later read faults them back in
    /// from the file). The fused Gemma 3 path holds its weights in its own
    /// layout, so without this the file stayed resident next to them.
    pub fn release(&self, info: &TensorInfo) {
        self.release_range((self.header.data_offset + info.offset) as usize, info.size as usize);
    }

    /// [`GgufFile::release`] of the whole pages inside `start..start + len`.
    pub fn release_range(&self, start: usize, len: usize) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let (lo, hi) = (start.next_multiple_of(PAGE), (start + len).min(self.mmap.len()) / PAGE * PAGE);
            if hi > lo {
                // SAFETY: the map is a read-only file mapping; MADV_DONTNEED
                // drops clean pages, whose contents are read again from the
                // file on the next access, so no byte any slice sees changes.
                // A refusal only leaves the pages resident: nothing to report.
                let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo) };
            }
        }
        #[cfg(not(unix))]
        let _ = (start, len);
    }

    /// Loads a tensor in its stored (possibly quantized) type.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor { name: name.to_string() })?;
        let dtype = info.ty.ggml_dtype().ok_or_else(|| {
            Error::Unsupported(format!(
                "tensor `{name}` has GGML type {}, which attn cannot compute with",
                info.ty.name()
            ))
        })?;
        Ok(qtensor_from_ggml(dtype, self.tensor_data(info), info.shape(), device)?)
    }
}

/// A tensor to write: name, type, GGML-order dims and its raw bytes.
pub struct TensorToWrite<'a> {
    pub name: &'a str,
    pub ty: TensorType,
    /// GGML order (innermost first).
    pub dims: Vec<u64>,
    pub data: &'a [u8],
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> std::result::Result<(), String> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let ty = items.first().map_or(4, value_type);
            if items.iter().any(|i| value_type(i) != ty) {
                return Err("GGUF arrays must hold a single value type".into());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i)?;
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
    Ok(())
}

/// Serialises a GGUF v3 file (alignment 32) into bytes.
pub fn write_gguf(metadata: &BTreeMap<String, Value>, tensors: &[TensorToWrite<'_>]) -> Result<Vec<u8>> {
    let bad = |e: String| Error::input("gguf writer", e);
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut out, k);
        out.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut out, v).map_err(bad)?;
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        let expected = t.ty.block().map(|(b, s)| t.dims.iter().product::<u64>() / b * s);
        if expected != Some(t.data.len() as u64) {
            return Err(bad(format!(
                "tensor `{}`: {} bytes do not fit {:?} {}",
                t.name,
                t.data.len(),
                t.dims,
                t.ty.name()
            )));
        }
        put_string(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ty.0.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    let pad_to = |out: &mut Vec<u8>, n: usize| out.resize(n, 0);
    let data_start = (out.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    pad_to(&mut out, data_start as usize);
    for (t, off) in tensors.iter().zip(offsets) {
        pad_to(&mut out, (data_start + off) as usize);
        out.extend_from_slice(t.data);
    }
    Ok(out)
}

impl GgufFile {
    fn meta(&self, key: &str) -> Result<&Value> {
        self.header
            .metadata
            .get(key)
            .ok_or_else(|| Error::format(&self.path, format!("metadata key `{key}` is missing")))
    }

    /// A required unsigned integer from the metadata.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self.meta(key)?;
        v.as_u64()
            .ok_or_else(|| Error::format(&self.path, format!("metadata `{key}` = {} is not an integer", v.summary())))
    }

    /// A required number from the metadata.
    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        let v = self.meta(key)?;
        v.as_f64()
            .ok_or_else(|| Error::format(&self.path, format!("metadata `{key}` = {} is not a number", v.summary())))
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        let v = self.meta(key)?;
        v.as_str()
            .ok_or_else(|| Error::format(&self.path, format!("metadata `{key}` = {} is not a string", v.summary())))
    }

    /// An optional metadata value.
    pub fn meta_opt(&self, key: &str) -> Option<&Value> {
        self.header.metadata.get(key)
    }

    fn checked_info(&self, name: &str, shape: &[usize]) -> Result<&TensorInfo> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor { name: name.to_string() })?;
        if info.shape() != shape {
            return Err(Error::TensorShape { name: name.to_string(), expected: shape.to_vec(), got: info.shape() });
        }
        Ok(info)
    }

    /// A tensor of the expected row-major `shape`, kept in its stored type.
    pub fn qtensor_checked(&self, name: &str, shape: &[usize], device: &Device) -> Result<Arc<QTensor>> {
        self.checked_info(name, shape)?;
        Ok(Arc::new(self.qtensor(name, device)?))
    }

    /// A tensor of the expected shape, dequantized to f32.
    pub fn dense(&self, name: &str, shape: &[usize], device: &Device) -> Result<candle_core::Tensor> {
        self.checked_info(name, shape)?;
        Ok(self.qtensor(name, device)?.dequantize(device)?)
    }

    /// A matrix `[rows, cols]` in the block format of the fused inference
    /// path, converted straight from the file's bytes: Q8_0, Q5_0, Q4_0,
    /// Q4_1, Q4_K and Q6_K exactly (at their stored width with the VNNI
    /// kernel); any other type dequantized by candle sixteen rows at a time
    /// and quantized to 8 bits (never a whole f32 copy of the tensor).
    ///
    /// A large tensor (Gemma 3's 178 MB embedding) is converted
    /// [`Q8_CHUNK_ROWS`] rows at a time, each chunk's file pages released
    /// once converted, so the file's copy and the converted one are never
    /// both resident (that was the 543 MB peak of a 365 MB model).
    pub fn q8_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<attn_nn::kernels::q8::Q8Matrix> {
        use attn_nn::kernels::q8::Q8Matrix;
        let info = self.checked_info(name, &[rows, cols])?;
        let data = self.tensor_data(info);
        let context = |e: Error| Error::format(self.path(), format!("tensor `{name}` ({}): {e}", info.ty.name()));
        if rows > Q8_CHUNK_ROWS && data.len() >= 16 << 20 && data.len() % rows == 0 {
            let row_bytes = data.len() / rows;
            let start = (self.header.data_offset + info.offset) as usize;
            let mut m: Option<Q8Matrix> = None;
            for r0 in (0..rows).step_by(Q8_CHUNK_ROWS) {
                let n = Q8_CHUNK_ROWS.min(rows - r0);
                let part = self.q8_from_bytes(name, info, &data[r0 * row_bytes..(r0 + n) * row_bytes], n, cols)?;
                let dst = m.get_or_insert_with(|| Q8Matrix::empty_like(&part, rows));
                dst.splice_rows(r0, &part).map_err(context)?;
                self.release_range(start + r0 * row_bytes, n * row_bytes);
            }
            return m.ok_or_else(|| context(Error::input("q8 matrix", "no rows")));
        }
        let m = self.q8_from_bytes(name, info, data, rows, cols)?;
        self.release(info);
        Ok(m)
    }

    /// The columns of one quantization block of tensor `name` (1 for
    /// float tensors): a matrix splits by columns only at multiples of it.
    pub fn block_width(&self, name: &str) -> Result<usize> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor { name: name.to_string() })?;
        let (per, _) = info.ty.block().ok_or_else(|| {
            Error::Unsupported(format!("tensor `{name}` has GGML type {}, which attn cannot read", info.ty.name()))
        })?;
        Ok(per as usize)
    }

    /// Rows `r` and columns `c` of matrix `name` (`[rows, cols]`) for attn's
    /// block kernels, cut from the file's own blocks (for tensor
    /// parallelism: each rank converts only its part). `c` must start and
    /// end on block boundaries ([`GgufFile::block_width`]).
    pub fn q8_matrix_part(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        r: std::ops::Range<usize>,
        c: std::ops::Range<usize>,
    ) -> Result<attn_nn::kernels::q8::Q8Matrix> {
        if r == (0..rows) && c == (0..cols) {
            return self.q8_matrix(name, rows, cols);
        }
        let info = self.checked_info(name, &[rows, cols])?;
        let per = self.block_width(name)?;
        let (_, size) = info.ty.block().unwrap_or((1, 4));
        let size = size as usize;
        if r.end > rows
            || c.end > cols
            || r.is_empty()
            || c.is_empty()
            || c.start % per != 0
            || (c.end % per != 0 && c.end != cols)
        {
            return Err(Error::input(
                "tensor part",
                format!("rows {r:?} x columns {c:?} of `{name}` ({rows}x{cols}, blocks of {per} columns)"),
            ));
        }
        let data = self.tensor_data(info);
        let row_bytes = cols.div_ceil(per) * size;
        let (b0, b1) = (c.start / per * size, c.end.div_ceil(per) * size);
        let mut part = Vec::with_capacity(r.len() * (b1 - b0));
        for row in r.clone() {
            part.extend_from_slice(&data[row * row_bytes + b0..row * row_bytes + b1]);
        }
        let m = self.q8_from_bytes(name, info, &part, r.len(), c.len())?;
        self.release(info);
        Ok(m)
    }

    /// [`GgufFile::q8_matrix`] of `data`, `rows` rows of tensor `info`.
    fn q8_from_bytes(
        &self,
        name: &str,
        info: &TensorInfo,
        data: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<attn_nn::kernels::q8::Q8Matrix> {
        use attn_nn::kernels::q8::Q8Matrix;
        let context = |e: Error| Error::format(self.path(), format!("tensor `{name}` ({}): {e}", info.ty.name()));
        let m = match info.ty {
            TensorType(8) => Q8Matrix::from_q8_0_bytes(data, rows, cols),
            TensorType(6) => Q8Matrix::from_q5_0_bytes(data, rows, cols),
            TensorType(2) => Q8Matrix::from_q4_0_bytes(data, rows, cols),
            TensorType(3) => Q8Matrix::from_q4_1_bytes(data, rows, cols),
            TensorType(12) => Q8Matrix::from_q4_k_bytes(data, rows, cols),
            TensorType(14) => Q8Matrix::from_q6_k_bytes(data, rows, cols),
            ty => {
                let unsupported = || {
                    Error::Unsupported(format!(
                        "tensor `{name}` has GGML type {}, which attn cannot compute with",
                        ty.name()
                    ))
                };
                let dtype = ty.ggml_dtype().ok_or_else(unsupported)?;
                let (per, size) = ty.block().ok_or_else(unsupported)?;
                let (per, size) = (per as usize, size as usize);
                let row_bytes = if cols % per == 0 { cols / per * size } else { 0 };
                if row_bytes == 0 || rows.checked_mul(row_bytes) != Some(data.len()) {
                    return Err(context(Error::input(
                        "q8 matrix",
                        format!("{} bytes for a {rows}x{cols} matrix in blocks of {per}", data.len()),
                    )));
                }
                Q8Matrix::from_f32_rows(rows, cols, |r0, n, out| {
                    let part = &data[r0 * row_bytes..(r0 + n) * row_bytes];
                    let t = qtensor_from_ggml(dtype, part, vec![n, cols], &Device::Cpu)?.dequantize(&Device::Cpu)?;
                    out.copy_from_slice(&t.flatten_all()?.to_vec1::<f32>()?);
                    Ok(())
                })
            }
        }
        .map_err(context)?;
        Ok(m)
    }

    /// A 1-D f32 vector (norm scales).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.dense(name, &[len], &Device::Cpu)?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
    }

    /// A bias-free linear layer `[out, in]` on the stored (quantized) weight.
    ///
    /// Q5_0 matrices are repacked to Q8_0 on load: losslessly (a Q5_0 block
    /// is a shared f16 scale times 5-bit integers, which Q8_0 holds exactly)
    /// and the product with Q8_0 activations is the same sum, but candle has
    /// an AVX2 kernel for Q8_0 and only a scalar one for Q5_0.
    pub fn linear(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
        device: &Device,
    ) -> Result<attn_nn::Linear> {
        let info = self.checked_info(name, &[out_features, in_features])?;
        if self.dequantize {
            return attn_nn::Linear::new(self.qtensor(name, device)?.dequantize(device)?, None);
        }
        let q = if info.ty == TensorType(6) {
            let data = repack_q5_0_as_q8_0(self.tensor_data(info));
            qtensor_from_ggml(GgmlDType::Q8_0, &data, info.shape(), device)?
        } else {
            self.qtensor(name, device)?
        };
        attn_nn::Linear::from_qtensor(Arc::new(q), None)
    }
}

/// Rewrites Q5_0 blocks (f16 scale, 4 bytes of high bits, 16 bytes of low
/// nibbles; value = scale * (q - 16)) as Q8_0 blocks (f16 scale, 32 i8)
/// holding exactly the same values.
pub fn repack_q5_0_as_q8_0(q5: &[u8]) -> Vec<u8> {
    const Q5: usize = 22;
    const Q8: usize = 34;
    let mut out = Vec::with_capacity(q5.len() / Q5 * Q8);
    for b in q5.chunks_exact(Q5) {
        out.extend_from_slice(&b[0..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let mut vals = [0i8; 32];
        for j in 0..16 {
            let lo = (qs[j] & 0x0f) | ((((qh >> j) << 4) & 0x10) as u8);
            let hi = (qs[j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
            vals[j] = lo as i8 - 16;
            vals[j + 16] = hi as i8 - 16;
        }
        out.extend(vals.iter().map(|&v| v as u8));
    }
    out
}

/// A GGUF file as a [`attn_nn::WeightSource`], for models that load by
/// parameter name (BERT, models trained by attn). Vectors and embedding
/// tables are dequantized on request; matrices stored in a block format
/// reach [`attn_nn::Linear::load`] still quantized (Q5_0 repacked to Q8_0,
/// as [`GgufFile::linear`] does).
pub struct GgufSource {
    file: Arc<GgufFile>,
    /// The model's parameter name -> the tensor's name in the file, where
    /// they differ (llama.cpp's names for BERT).
    rename: std::collections::HashMap<String, String>,
}

impl GgufSource {
    pub fn new(file: Arc<GgufFile>, rename: std::collections::HashMap<String, String>) -> Self {
        GgufSource { file, rename }
    }

    fn file_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.rename.get(name).map_or(name, String::as_str)
    }
}

impl attn_nn::WeightSource for GgufSource {
    fn load(
        &self,
        name: &str,
        shape: &[usize],
        _init: attn_nn::Init,
        dtype: candle_core::DType,
        device: &Device,
    ) -> Result<candle_core::Tensor> {
        Ok(self.file.dense(self.file_name(name), shape, device)?.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.file.tensor_info(self.file_name(name)).is_some()
    }

    fn load_quantized(&self, name: &str, device: &Device) -> Result<Option<Arc<QTensor>>> {
        let file_name = self.file_name(name);
        let info =
            self.file.tensor_info(file_name).ok_or_else(|| Error::MissingTensor { name: file_name.to_string() })?;
        // Float types (F32, F16, BF16) load dense.
        if self.file.dequantize || matches!(info.ty.0, 0 | 1 | 30) {
            return Ok(None);
        }
        let q = if info.ty == TensorType(6) {
            let data = repack_q5_0_as_q8_0(self.file.tensor_data(info));
            qtensor_from_ggml(GgmlDType::Q8_0, &data, info.shape(), device)?
        } else {
            self.file.qtensor(file_name, device)?
        };
        Ok(Some(Arc::new(q)))
    }
}
