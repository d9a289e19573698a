//! The safetensors file format: a strict header parser over a memory-mapped file, and a streaming
//! writer.
//!
//! Layout: `u64` little-endian header length `n`, `n` bytes of JSON, then the data section. The JSON
//! maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to
//! the data section) and may hold `"__metadata__"`: a string-to-string map (or `null`).
//!
//! The parser is ours rather than the `safetensors` crate's so that every fault is reported with the
//! tensor it concerns (the crate reports, e.g., a shape/size mismatch without naming the tensor). It
//! accepts exactly what the crate accepts: the tensors must tile the data section, in offset order,
//! without gaps or overlaps, and each must hold `numel * dtype_size` bytes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, IoContext, Result};

/// Largest header accepted (the same bound as the `safetensors` crate).
pub const MAX_HEADER: usize = 100_000_000;

/// Element types a safetensors file may declare. Only some are accepted as model weights; the rest
/// are parsed so that a refusal can name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl DType {
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "BOOL" => DType::Bool,
            "U8" => DType::U8,
            "I8" => DType::I8,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E5M2" => DType::F8E5M2,
            "I16" => DType::I16,
            "U16" => DType::U16,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I32" => DType::I32,
            "U32" => DType::U32,
            "F32" => DType::F32,
            "I64" => DType::I64,
            "U64" => DType::U64,
            "F64" => DType::F64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// Whether this dtype is accepted for Ouro weights.
    pub fn is_weight_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A parsed header: tensors in data order, and the free-form metadata.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// Length of the JSON text (the `n` of the layout).
    pub json_len: usize,
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

impl Header {
    /// Offset of the data section from the start of the file.
    pub fn data_start(&self) -> usize {
        8 + self.json_len
    }
}

/// Parses and validates the header of a whole safetensors file held in `buf`. Returns a message
/// (without the file name) on any fault; never panics.
///
/// ```
/// use ouro_quant::stfile::{parse_header, DType};
/// let json = br#"{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
/// let mut file = (json.len() as u64).to_le_bytes().to_vec();
/// file.extend_from_slice(json);
/// file.extend_from_slice(&[0, 0, 0, 0]);
/// let h = parse_header(&file).unwrap();
/// assert_eq!((h.tensors[0].dtype, h.tensors[0].nbytes()), (DType::BF16, 4));
/// // one byte short: the tensor is named
/// assert!(parse_header(&file[..file.len() - 1]).unwrap_err().contains("tensor `w`"));
/// ```
pub fn parse_header(buf: &[u8]) -> std::result::Result<Header, String> {
    if buf.len() < 8 {
        return Err(format!(
            "file is {} bytes, too short for a safetensors header (truncated or empty file)",
            buf.len()
        ));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    let avail = (buf.len() - 8) as u64;
    if n > avail {
        return Err(format!(
            "header length {n} exceeds the {avail} bytes that follow it: truncated file, or not a safetensors file"
        ));
    }
    let n = n as usize;
    if n > MAX_HEADER {
        return Err(format!("header length {n} is larger than the {MAX_HEADER}-byte limit"));
    }
    let text = std::str::from_utf8(&buf[8..8 + n])
        .map_err(|e| format!("header is not UTF-8 text ({e}): not a safetensors file"))?;
    let value: serde_json::Value = crate::json::parse(text)
        .map_err(|e| format!("header is not valid JSON ({e}): truncated, not a safetensors file, or a tensor named twice"))?;
    let serde_json::Value::Object(map) = value else {
        return Err("header JSON is not an object".into());
    };
    let data_len = buf.len() - 8 - n;
    let mut tensors = Vec::with_capacity(map.len());
    let mut metadata = BTreeMap::new();
    for (name, entry) in &map {
        if name == "__metadata__" {
            // `null` is what mx.save_safetensors writes without metadata; the crate accepts it.
            if entry.is_null() {
                continue;
            }
            let obj = entry
                .as_object()
                .ok_or_else(|| "`__metadata__` is not an object".to_string())?;
            for (k, v) in obj {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("`__metadata__` value for `{k}` is not a string"))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        tensors.push(parse_entry(name, entry)?);
    }
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let mut pos = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        if t.begin != pos {
            return Err(if t.begin < pos {
                format!(
                    "tensor `{}`: data_offsets [{}, {}] overlap tensor `{}`",
                    t.name,
                    t.begin,
                    t.end,
                    tensors[i - 1].name
                )
            } else {
                format!(
                    "tensor `{}`: data_offsets [{}, {}] leave a gap of {} bytes before it",
                    t.name,
                    t.begin,
                    t.end,
                    t.begin - pos
                )
            });
        }
        if t.end > data_len {
            return Err(format!(
                "tensor `{}`: data_offsets [{}, {}] reach past the end of the data section ({} bytes): file truncated",
                t.name, t.begin, t.end, data_len
            ));
        }
        pos = t.end;
    }
    if pos != data_len {
        return Err(format!(
            "the tensors cover {pos} bytes but the data section holds {data_len}: {} unexplained trailing bytes",
            data_len - pos
        ));
    }
    Ok(Header {
        json_len: n,
        tensors,
        metadata,
    })
}

fn parse_entry(name: &str, entry: &serde_json::Value) -> std::result::Result<TensorInfo, String> {
    let bad = |msg: String| format!("tensor `{name}`: {msg}");
    let obj = entry
        .as_object()
        .ok_or_else(|| bad("header entry is not an object".into()))?;
    let dtype_s = obj
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("missing or non-string `dtype`".into()))?;
    let dtype = DType::parse(dtype_s).ok_or_else(|| bad(format!("unknown dtype `{dtype_s}`")))?;
    let shape_v = obj
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("missing or non-array `shape`".into()))?;
    let mut shape = Vec::with_capacity(shape_v.len());
    for d in shape_v {
        let d = d
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| bad(format!("shape entry {d} is not a non-negative integer")))?;
        shape.push(d);
    }
    let offs = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("missing `data_offsets` or not a pair".into()))?;
    let off = |v: &serde_json::Value| v.as_u64().and_then(|x| usize::try_from(x).ok());
    let (Some(begin), Some(end)) = (off(&offs[0]), off(&offs[1])) else {
        return Err(bad("data_offsets are not non-negative integers".into()));
    };
    if end < begin {
        return Err(bad(format!("data_offsets [{begin}, {end}] end before they begin")));
    }
    let need = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size()))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if need != end - begin {
        return Err(bad(format!(
            "shape {shape:?} of {dtype} needs {need} bytes but data_offsets [{begin}, {end}] span {}",
            end - begin
        )));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// A memory-mapped safetensors file with its validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Option<Mmap>,
    header: Header,
    index: HashMap<String, usize>,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header (every fault is reported with the file's path).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).at(&path)?;
        let len = file.metadata().at(&path)?.len();
        // mmap of an empty file fails; an empty buffer gives the parser's own message.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only; a file truncated by another process while mapped is
            // outside what any reader of memory-mapped files can defend against.
            Some(unsafe { Mmap::map(&file) }.at(&path)?)
        };
        let buf: &[u8] = map.as_deref().unwrap_or(&[]);
        let header = parse_header(buf).map_err(|m| Error::file(&path, m))?;
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafetensorsFile {
            path,
            map,
            header,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.header.tensors[i])
    }
    /// Size of the file in bytes.
    pub fn file_len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    /// Drops the pages of tensor `name` from this process's resident memory once it has been
    /// consumed (they stay in the page cache), so streaming a whole model keeps RSS small.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let (Some(m), Some(t)) = (self.map.as_ref(), self.info(name)) {
            let start = self.header.data_start() + t.begin;
            // SAFETY: the map is a read-only view of a file; MADV_DONTNEED only drops the page
            // table entries, and a later read faults the same bytes back in from the file.
            unsafe {
                let _ = m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, t.nbytes());
            }
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// The raw little-endian bytes of tensor `name` (zero-copy).
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let t = self.info(name)?;
        let start = self.header.data_start();
        self.map
            .as_deref()
            .map(|m| &m[start + t.begin..start + t.end])
    }
}

/// One tensor to be written: its entry and where its bytes come from.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Builds the header bytes (length prefix + JSON padded with spaces to a multiple of 8, as the
/// reference writer does) for tensors written in the given order.
pub fn header_bytes(tensors: &[TensorSpec], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    if !metadata.is_empty() {
        obj.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("string map"),
        );
    }
    let mut pos = 0usize;
    for t in tensors {
        let n = t.nbytes();
        obj.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [pos, pos + n]}),
        );
        pos += n;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(obj)).expect("json");
    while !(json.len() + 8).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// Writes a safetensors file tensor by tensor, in the order of the specs given to [`Writer::new`].
/// Only one tensor's bytes need be in memory at a time.
pub struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    specs: Vec<TensorSpec>,
    next: usize,
    written_in_current: usize,
    sum: crate::output::Checksummer,
    /// Bytes written (header included).
    offset: u64,
    writeback: crate::output::Writeback,
}

impl Writer {
    /// Creates `path` (which should be a temporary path; see [`crate::output`]) and writes the header.
    pub fn new(
        path: impl AsRef<Path>,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).at(&path)?;
        // small: tensor data (megabytes per write) then goes straight to the file without a copy
        let mut out = BufWriter::with_capacity(64 << 10, file);
        let head = header_bytes(&specs, metadata);
        out.write_all(&head).at(&path)?;
        let mut sum = crate::output::Checksummer::new();
        sum.update(&head);
        Ok(Writer {
            path,
            out,
            specs,
            next: 0,
            written_in_current: 0,
            sum,
            offset: head.len() as u64,
            writeback: Default::default(),
        })
    }

    /// Appends bytes of the current tensor; a tensor may be written in several pieces.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let Some(spec) = self.specs.get(self.next) else {
                return Err(Error::file(&self.path, "more tensor bytes written than declared"));
            };
            let room = spec.nbytes() - self.written_in_current;
            let take = room.min(rest.len());
            self.out.write_all(&rest[..take]).at(&self.path)?;
            self.sum.update(&rest[..take]);
            self.offset += take as u64;
            self.written_in_current += take;
            rest = &rest[take..];
            if self.written_in_current == spec.nbytes() {
                self.next += 1;
                self.written_in_current = 0;
            }
        }
        // Tensors of zero bytes are complete as soon as they are reached.
        while self.specs.get(self.next).is_some_and(|s| s.nbytes() == 0) {
            self.next += 1;
        }
        self.writeback.advance(&self.out, self.offset);
        Ok(())
    }

    /// The spec of the tensor whose bytes are expected next.
    pub fn current(&self) -> Option<&TensorSpec> {
        self.specs.get(self.next)
    }

    /// Flushes and syncs; fails if any declared tensor is incomplete. Returns the checksum of
    /// every byte written (the whole file).
    pub fn finish(mut self) -> Result<crate::output::Checksum> {
        self.write(&[])?;
        if let Some(spec) = self.specs.get(self.next) {
            return Err(Error::tensor(
                &self.path,
                &spec.name,
                "file closed before all of the tensor's bytes were written",
            ));
        }
        self.out.flush().at(&self.path)?;
        self.out.get_ref().sync_all().at(&self.path)?;
        Ok(self.sum.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(json: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend_from_slice(data);
        v
    }

    /// A file several writeback steps long, written in uneven pieces, reads back byte for byte
    /// (the writeback hints run on it) and its returned checksum is the file's.
    #[test]
    fn long_file_written_in_pieces_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("big.safetensors");
        let n = (2 * crate::output::Writeback::STEP + 12_345) as usize;
        let specs = vec![
            TensorSpec { name: "a".into(), dtype: DType::U8, shape: vec![n] },
            TensorSpec { name: "b".into(), dtype: DType::U8, shape: vec![1000] },
        ];
        let data: Vec<u8> = (0..n + 1000).map(|i| (i * 31 % 251) as u8).collect();
        let mut w = Writer::new(&path, specs, &BTreeMap::new()).unwrap();
        for piece in data.chunks(3 << 20 | 17) {
            w.write(piece).unwrap();
        }
        let sum = w.finish().unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert!(f.bytes("a").unwrap() == &data[..n] && f.bytes("b").unwrap() == &data[n..]);
        assert_eq!(sum, crate::output::checksum(&std::fs::read(&path).unwrap()));
    }

    #[test]
    fn round_trip_header() {
        let specs = vec![
            TensorSpec {
                name: "b".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "a".into(),
                dtype: DType::BF16,
                shape: vec![4],
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), "pt".into());
        let mut buf = header_bytes(&specs, &meta);
        assert_eq!(buf.len() % 8, 0);
        buf.extend(std::iter::repeat_n(7u8, 24 + 8));
        let h = parse_header(&buf).unwrap();
        assert_eq!(h.tensors[0].name, "b");
        assert_eq!((h.tensors[1].begin, h.tensors[1].end), (24, 32));
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn rejects_faults_with_the_tensor_named() {
        let e = parse_header(&file_with(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}}"#,
            &[0; 12],
        ))
        .unwrap_err();
        assert!(e.contains("`w`") && e.contains("needs 8 bytes"), "{e}");
        let e = parse_header(&file_with(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            &[0; 8],
        ))
        .unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        let e = parse_header(&file_with(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 10],
        ))
        .unwrap_err();
        assert!(e.contains("`a`") && e.contains("truncated"), "{e}");
        let e = parse_header(&file_with(r#"{"a":{"dtype":"Q9","shape":[],"data_offsets":[0,0]}}"#, &[]))
            .unwrap_err();
        assert!(e.contains("unknown dtype `Q9`"), "{e}");
    }
}
