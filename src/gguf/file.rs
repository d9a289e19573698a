//! The GGUF v3 container: typed metadata, tensor infos and aligned tensor data. A streaming writer
//! (tensor data is appended one tensor at a time at precomputed offsets) and a strict reader that
//! enforces what ggml's own loader enforces (gguf-py accepts more): offsets are exactly the running
//! sum of padded sizes in info order, names are at most 63 bytes, keys and names are unique,
//! arrays are not nested, and the data ends inside the file.
//!
//! Layout (little-endian): `GGUF`, u32 version, u64 tensor count, u64 KV count, the KVs (string key,
//! u32 value type, value), the tensor infos (name, u32 n_dims, u64 dims innermost first, u32 ggml
//! type, u64 offset relative to the data section), zero padding to the alignment, tensor data with
//! each tensor padded to the alignment.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, IoContext, Result};
use crate::quant::ggml::GgmlType;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's `GGML_MAX_NAME` is 64 including the terminating NUL.
pub const MAX_NAME: usize = 63;

/// A metadata value with its GGUF type.
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
    Str(String),
    /// Element type id and elements (all of that type, none an array).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    pub fn type_name(&self) -> &'static str {
        type_name(self.type_id())
    }

    pub fn strings(v: impl IntoIterator<Item = String>) -> Value {
        Value::Array(8, v.into_iter().map(Value::Str).collect())
    }
    pub fn f32s(v: impl IntoIterator<Item = f32>) -> Value {
        Value::Array(6, v.into_iter().map(Value::F32).collect())
    }
    pub fn i32s(v: impl IntoIterator<Item = i32>) -> Value {
        Value::Array(5, v.into_iter().map(Value::I32).collect())
    }

    pub fn as_u32(&self) -> Option<u32> {
        match *self {
            Value::U32(x) => Some(x),
            _ => None,
        }
    }
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(x) => Some(x),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
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
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::Str(s) => write_str(out, s),
            Value::Array(t, items) => {
                out.extend_from_slice(&t.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    it.write(out);
                }
            }
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
}

/// Name of a GGUF value type id.
pub fn type_name(id: u32) -> &'static str {
    match id {
        0 => "UINT8",
        1 => "INT8",
        2 => "UINT16",
        3 => "INT16",
        4 => "UINT32",
        5 => "INT32",
        6 => "FLOAT32",
        7 => "BOOL",
        8 => "STRING",
        9 => "ARRAY",
        10 => "UINT64",
        11 => "INT64",
        12 => "FLOAT64",
        _ => "unknown",
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One tensor's entry: name, shape in row-major order (outermost first, as in safetensors) and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Outermost first: `[rows, cols]` for a matrix. GGUF stores the reverse.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Offset inside the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of the tensor's data (without padding).
    pub fn nbytes(&self) -> usize {
        self.checked_nbytes().expect("a parsed header's tensor sizes fit in memory")
    }

    /// [`Self::nbytes`], or `None` if it does not fit a `usize` (a corrupt shape: the header
    /// parser refuses those).
    fn checked_nbytes(&self) -> Option<usize> {
        let cols = *self.shape.last().unwrap_or(&1);
        let rows = self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))? / cols.max(1);
        self.ggml_type.checked_row_bytes(cols)?.checked_mul(rows)
    }
}

fn pad(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

/// Serializes the header, KVs and tensor infos (offsets assigned in order), padded to `align`.
/// Returns the bytes and the infos with their offsets.
pub fn header_bytes(kvs: &[(String, Value)], tensors: &[(String, Vec<usize>, GgmlType)], align: usize) -> (Vec<u8>, Vec<TensorInfo>) {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        write_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        v.write(&mut out);
    }
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for (name, shape, ty) in tensors {
        write_str(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        let info = TensorInfo {
            name: name.clone(),
            shape: shape.clone(),
            ggml_type: *ty,
            offset,
        };
        offset += pad(info.nbytes(), align) as u64;
        infos.push(info);
    }
    let n = pad(out.len(), align);
    out.resize(n, 0);
    (out, infos)
}

/// Writes a GGUF file: header first, then each tensor's bytes in info order.
pub struct Writer {
    path: PathBuf,
    header_len: usize,
    out: BufWriter<File>,
    infos: Vec<TensorInfo>,
    align: usize,
    next: usize,
    written: usize,
    /// Bytes written (header and padding included).
    offset: u64,
    writeback: crate::output::Writeback,
}

impl Writer {
    /// Creates `path` and writes everything before the tensor data.
    pub fn create(path: &Path, kvs: &[(String, Value)], tensors: &[(String, Vec<usize>, GgmlType)]) -> Result<Self> {
        let align = alignment_of(kvs);
        let (head, infos) = header_bytes(kvs, tensors, align);
        let file = File::create(path).at(path)?;
        // small: tensor data (megabytes per write) then goes straight to the file without a copy
        let mut out = BufWriter::with_capacity(64 << 10, file);
        out.write_all(&head).at(path)?;
        Ok(Writer {
            path: path.to_path_buf(),
            header_len: head.len(),
            out,
            infos,
            align,
            next: 0,
            written: 0,
            offset: head.len() as u64,
            writeback: Default::default(),
        })
    }

    pub fn infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// Bytes before the tensor data (header, KVs, infos, padding).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Appends bytes of the current tensor; pads when it is complete.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let info = self
                .infos
                .get(self.next)
                .ok_or_else(|| Error::file(&self.path, "more tensor data written than declared"))?;
            let need = info.nbytes() - self.written;
            let take = need.min(bytes.len());
            self.out.write_all(&bytes[..take]).at(&self.path)?;
            self.written += take;
            self.offset += take as u64;
            bytes = &bytes[take..];
            if self.written == info.nbytes() {
                let padding = pad(info.nbytes(), self.align) - info.nbytes();
                self.out.write_all(&vec![0u8; padding]).at(&self.path)?;
                self.offset += padding as u64;
                self.next += 1;
                self.written = 0;
            }
        }
        self.writeback.advance(&self.out, self.offset);
        Ok(())
    }

    /// Flushes and syncs; every declared tensor must be complete.
    pub fn finish(mut self) -> Result<()> {
        if let Some(info) = self.infos.get(self.next) {
            return Err(Error::tensor(&self.path, &info.name, "file closed before the tensor was written"));
        }
        self.out.flush().at(&self.path)?;
        self.out.get_ref().sync_all().at(&self.path)?;
        Ok(())
    }
}

fn alignment_of(kvs: &[(String, Value)]) -> usize {
    kvs.iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u32())
        .map_or(DEFAULT_ALIGNMENT, |a| a as usize)
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    /// Offset of the data section in the file.
    pub data_start: usize,
    /// For each KV, the file offset of its value (just after the value type).
    pub value_offsets: Vec<usize>,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// The file offset of `key`'s value (just after its type id).
    pub fn value_offset(&self, key: &str) -> Option<usize> {
        self.kvs.iter().position(|(k, _)| k == key).map(|i| self.value_offsets[i])
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!("truncated: {what} at byte {} needs {n} bytes, file has {}", self.pos, self.buf.len())
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4")))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8")))
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| format!("{what}: length {n} too large"))?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
    fn value(&mut self, ty: u32, what: &str, nested: bool) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2"))),
            3 => Value::I16(i16::from_le_bytes(self.take(2, what)?.try_into().expect("2"))),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.take(1, what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: bool byte {b} is neither 0 nor 1")),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if nested {
                    return Err(format!("{what}: nested arrays are not allowed"));
                }
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                // every element takes at least one byte: a count beyond the file is corrupt
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(format!("{what}: array of {n} elements cannot fit in the file"));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(et, what, true)?);
                }
                Value::Array(et, items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

/// Parses and validates the header of a whole GGUF file in `buf`. Never panics.
pub fn parse_header(buf: &[u8]) -> std::result::Result<Header, String> {
    let mut c = Cursor { buf, pos: 0 };
    if c.take(4, "magic")? != MAGIC {
        return Err("not a GGUF file (magic is not `GGUF`)".into());
    }
    let version = c.u32("version")?;
    if version != VERSION {
        return Err(format!("GGUF version {version} is not supported (only 3)"));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("KV count")?;
    // a KV takes at least 12 bytes, a tensor info at least 24
    if n_kv > buf.len() as u64 / 12 || n_tensors > buf.len() as u64 / 24 {
        return Err(format!("{n_tensors} tensors and {n_kv} KVs cannot fit in {} bytes", buf.len()));
    }
    let mut kvs = Vec::with_capacity(n_kv as usize);
    let mut value_offsets = Vec::with_capacity(n_kv as usize);
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let key = c.string(&format!("key {i}"))?;
        let ty = c.u32(&format!("type of `{key}`"))?;
        value_offsets.push(c.pos);
        let v = c.value(ty, &format!("value of `{key}`"), false)?;
        if !keys.insert(key.clone()) {
            return Err(format!("duplicate key `{key}`"));
        }
        kvs.push((key, v));
    }
    let alignment = match kvs.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => *a as usize,
        Some((_, v)) => return Err(format!("general.alignment must be a power-of-two UINT32, found {v:?}")),
    };
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    let mut expect = 0u64;
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor {i}"))?;
        if name.len() > MAX_NAME {
            return Err(format!("tensor `{name}`: name longer than {MAX_NAME} bytes"));
        }
        if !names.insert(name.clone()) {
            return Err(format!("duplicate tensor `{name}`"));
        }
        let n_dims = c.u32(&format!("tensor `{name}` n_dims"))?;
        if !(1..=4).contains(&n_dims) {
            return Err(format!("tensor `{name}`: {n_dims} dimensions (ggml allows 1 to 4)"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64(&format!("tensor `{name}` dims"))?;
            if d == 0 || d > i64::MAX as u64 {
                return Err(format!("tensor `{name}`: dimension {d} is invalid"));
            }
            dims.push(d as usize);
        }
        let tid = c.u32(&format!("tensor `{name}` type"))?;
        let ty = GgmlType::from_id(tid).ok_or_else(|| format!("tensor `{name}`: ggml type {tid} is not supported"))?;
        let offset = c.u64(&format!("tensor `{name}` offset"))?;
        dims.reverse();
        let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let cols = dims[dims.len() - 1];
        if numel.is_none() || cols % ty.block_size() != 0 {
            return Err(format!("tensor `{name}`: shape {dims:?} is not valid for {ty}"));
        }
        let info = TensorInfo {
            name: name.clone(),
            shape: dims,
            ggml_type: ty,
            offset,
        };
        if offset != expect {
            return Err(format!("tensor `{name}`: offset {offset} is not the running sum of padded sizes ({expect})"));
        }
        // (bytes per value times values can overflow where the count alone did not)
        expect = info
            .checked_nbytes()
            .and_then(|n| n.checked_next_multiple_of(alignment))
            .and_then(|n| expect.checked_add(n as u64))
            .ok_or_else(|| format!("tensor `{name}`: size overflows"))?;
        tensors.push(info);
    }
    let data_start = pad(c.pos, alignment);
    // (offset + size of the last tensor is at most the checked running sum)
    let need = (data_start as u64).saturating_add(tensors.last().map_or(0, |t| t.offset + t.nbytes() as u64));
    if need > buf.len() as u64 {
        return Err(format!("tensor data needs {need} bytes but the file has {}: truncated", buf.len()));
    }
    Ok(Header {
        version,
        kvs,
        tensors,
        alignment,
        data_start,
        value_offsets,
    })
}

/// A memory-mapped GGUF file with its validated header.
pub struct GgufFile {
    pub path: PathBuf,
    map: Mmap,
    pub header: Header,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let f = File::open(&path).at(&path)?;
        if f.metadata().at(&path)?.len() < 24 {
            return Err(Error::file(&path, "too short to be a GGUF file"));
        }
        // SAFETY: read-only map; see SafetensorsFile::open.
        let map = unsafe { Mmap::map(&f) }.at(&path)?;
        let header = parse_header(&map).map_err(|m| Error::file(&path, m))?;
        Ok(GgufFile { path, map, header })
    }

    /// The bytes of a tensor (without padding).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let s = self.header.data_start + info.offset as usize;
        &self.map[s..s + info.nbytes()]
    }

    pub fn file_len(&self) -> usize {
        self.map.len()
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Drops a tensor's pages from this process's resident memory after it has been read (they
    /// stay in the page cache).
    pub fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            let s = self.header.data_start + info.offset as usize;
            // SAFETY: read-only file map; see SafetensorsFile::release.
            unsafe {
                let _ = self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, info.nbytes());
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_offsets_are_padded() {
        let kvs = vec![
            ("general.architecture".to_string(), Value::Str("ouro".into())),
            ("a.list".to_string(), Value::f32s([1.0, 2.5])),
            ("a.flag".to_string(), Value::Bool(true)),
        ];
        let tensors = vec![
            ("x".to_string(), vec![2, 32], GgmlType::Q8_0),
            ("y".to_string(), vec![3], GgmlType::F32),
        ];
        let (mut head, infos) = header_bytes(&kvs, &tensors, 32);
        assert_eq!(head.len() % 32, 0);
        assert_eq!(infos[1].offset, 96); // 68 bytes padded to 96
        head.resize(head.len() + 96 + 32, 0);
        let h = parse_header(&head).unwrap();
        assert_eq!(h.kvs, kvs);
        assert_eq!(h.tensors, infos);
        // one byte short of the last tensor's data: truncated
        let e = parse_header(&head[..head.len() - 32 - 96 + 96 + 12 - 1]).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
