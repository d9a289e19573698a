//! Recorded checksums: what `convert` records inside its outputs, and the check behind
//! `inspect --verify`, which re-reads a GGUF file or an MLX directory and compares every byte that
//! matters with what was recorded when it was written.
//!
//! - **GGUF**: three metadata keys. `ouro_quant.checksum.tensors` holds one checksum per tensor (in
//!   tensor-info order) of its data bytes; `ouro_quant.checksum.header` the checksum of every byte
//!   before the data section, taken with the checksum strings themselves replaced by `0`s (so the
//!   header can record its own checksum); the padding between tensors must be zero and nothing may
//!   follow the last tensor. Checksums are written as placeholders of the same length and patched
//!   in place once known, so no offset moves.
//! - **MLX**: `metadata.ouro_quant` in `model.safetensors.index.json` holds the checksum of every
//!   file of the directory (shards, config, model file, tokenizer files; not the index itself and
//!   not the model card, which users edit) and of every tensor: a shard whose checksum differs is
//!   read again tensor by tensor, so that the damage is traced to the tensor. A `*.safetensors` file that is not recorded is reported too: mlx_lm loads every
//!   `model*.safetensors` it finds.
//!
//! The checksum is XXH3-128 ([`crate::output::checksum`]), as 32 lowercase hex digits.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::gguf::file::{GgufFile, Header, Value};
use crate::output::{checksum, Checksum, Checksummer};
use crate::stfile::SafetensorsFile;

/// The checksum algorithm's name as recorded.
pub const ALGORITHM: &str = "xxh3-128";
/// GGUF key: the algorithm.
pub const GGUF_ALGORITHM_KEY: &str = "ouro_quant.checksum.algorithm";
/// GGUF key: checksum of the header (checksum strings blanked).
pub const GGUF_HEADER_KEY: &str = "ouro_quant.checksum.header";
/// GGUF key: array of per-tensor checksums.
pub const GGUF_TENSORS_KEY: &str = "ouro_quant.checksum.tensors";
/// The key under `metadata` in an MLX index.
pub const MLX_INDEX_KEY: &str = "ouro_quant";

const HEX_LEN: usize = 32;

/// A checksum as recorded: 32 lowercase hex digits.
pub fn hex(c: Checksum) -> String {
    format!("{c:032x}")
}

fn placeholder() -> String {
    "0".repeat(HEX_LEN)
}

/// The checksum keys of a GGUF file with `n_tensors` tensors, holding placeholders (see
/// [`record_gguf`]).
pub fn gguf_placeholder_kvs(n_tensors: usize) -> Vec<(String, Value)> {
    vec![
        (GGUF_ALGORITHM_KEY.to_string(), Value::Str(ALGORITHM.into())),
        (GGUF_HEADER_KEY.to_string(), Value::Str(placeholder())),
        (GGUF_TENSORS_KEY.to_string(), Value::strings(std::iter::repeat_n(placeholder(), n_tensors))),
    ]
}

/// The file ranges of the recorded checksum strings: the header's first, then one per tensor.
fn gguf_checksum_ranges(h: &Header) -> std::result::Result<Vec<Range<usize>>, String> {
    let string_at = |o: usize| o + 8..o + 8 + HEX_LEN;
    let head = match h.get(GGUF_HEADER_KEY) {
        Some(Value::Str(s)) if s.len() == HEX_LEN => string_at(h.value_offset(GGUF_HEADER_KEY).expect("key exists")),
        Some(_) => return Err(format!("`{GGUF_HEADER_KEY}` is not a string of {HEX_LEN} hex digits")),
        None => return Err(format!("`{GGUF_HEADER_KEY}` is missing")),
    };
    let mut ranges = vec![head];
    match h.get(GGUF_TENSORS_KEY) {
        Some(Value::Array(8, items)) if items.iter().all(|v| v.as_str().is_some_and(|s| s.len() == HEX_LEN)) => {
            // array: element type (4), count (8), then each string: length (8) + bytes
            let mut o = h.value_offset(GGUF_TENSORS_KEY).expect("key exists") + 12;
            for _ in items {
                ranges.push(string_at(o));
                o += 8 + HEX_LEN;
            }
        }
        Some(_) => return Err(format!("`{GGUF_TENSORS_KEY}` is not an array of {HEX_LEN}-digit strings")),
        None => return Err(format!("`{GGUF_TENSORS_KEY}` is missing")),
    }
    Ok(ranges)
}

/// The checksum of `head` (the bytes before the data section) with the checksum strings set to `0`s.
fn gguf_header_checksum(head: &[u8], ranges: &[Range<usize>]) -> Checksum {
    let mut head = head.to_vec();
    for r in ranges {
        head[r.clone()].fill(b'0');
    }
    checksum(&head)
}

/// Writes the per-tensor checksums `sums` (taken while the data was written) and the header's
/// checksum into the placeholders of the GGUF file at `path`, and syncs it.
pub fn record_gguf(path: &Path, sums: &[Checksum]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = GgufFile::open(path)?;
    let ranges = gguf_checksum_ranges(&f.header).map_err(|m| Error::file(path, format!("internal: {m}")))?;
    if ranges.len() != sums.len() + 1 {
        return Err(Error::file(path, "internal: checksum placeholders do not match the tensor count"));
    }
    let mut head = f.bytes()[..f.header.data_start].to_vec();
    drop(f);
    for (r, s) in ranges[1..].iter().zip(sums) {
        head[r.clone()].copy_from_slice(hex(*s).as_bytes());
    }
    let sum = gguf_header_checksum(&head, &ranges);
    head[ranges[0].clone()].copy_from_slice(hex(sum).as_bytes());
    let out = std::fs::OpenOptions::new().write(true).open(path).at(path)?;
    out.write_all_at(&head, 0).at(path)?;
    out.sync_all().at(path)
}

/// One thing that did not match what was recorded.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Mismatch {
    /// What was checked: `header`, `tensor NAME`, `file NAME`, `padding`...
    pub item: String,
    pub problem: String,
}

/// The outcome of checking an output against its recorded checksums.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub path: PathBuf,
    /// `gguf` or `mlx`.
    pub format: &'static str,
    pub algorithm: &'static str,
    /// Items compared (header, tensors, files).
    pub checked: usize,
    /// Bytes read.
    pub bytes: u64,
    pub mismatches: Vec<Mismatch>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "{} ({}): {} items, {} checked against recorded {} checksums\n",
            self.path.display(),
            self.format,
            self.checked,
            crate::inspect::human_bytes(self.bytes),
            self.algorithm
        );
        if self.ok() {
            s.push_str("OK: every recorded checksum matches\n");
        } else {
            for m in &self.mismatches {
                s.push_str(&format!("MISMATCH {}: {}\n", m.item, m.problem));
            }
            s.push_str(&format!("FAILED: {} mismatch(es)\n", self.mismatches.len()));
        }
        s
    }
}

fn mismatch(item: impl Into<String>, problem: impl Into<String>) -> Mismatch {
    Mismatch {
        item: item.into(),
        problem: problem.into(),
    }
}

fn compare(item: String, recorded: &str, found: Checksum) -> Option<Mismatch> {
    let found = hex(found);
    (recorded != found).then(|| mismatch(item, format!("checksum {found}, recorded {recorded}")))
}

/// Checks a GGUF file against its recorded checksums. An error means the file cannot be checked at
/// all (unreadable, not GGUF, no checksums recorded); damage the checksums reveal is returned as
/// mismatches.
pub fn verify_gguf(path: &Path) -> Result<VerifyReport> {
    let f = GgufFile::open(path)?;
    let h = &f.header;
    match h.get(GGUF_ALGORITHM_KEY).and_then(Value::as_str) {
        Some(ALGORITHM) => {}
        Some(other) => return Err(Error::file(path, format!("checksum algorithm `{other}` is not supported (only {ALGORITHM})"))),
        None => {
            return Err(Error::file(
                path,
                format!("no recorded checksums (`{GGUF_ALGORITHM_KEY}`): the file was not written by ouro-quant 0.1 or later"),
            ))
        }
    }
    let ranges = gguf_checksum_ranges(h).map_err(|m| Error::file(path, m))?;
    let recorded: Vec<&str> = h.get(GGUF_TENSORS_KEY).and_then(Value::as_array).unwrap_or(&[]).iter().filter_map(Value::as_str).collect();
    let mut report = VerifyReport {
        path: path.to_path_buf(),
        format: "gguf",
        algorithm: ALGORITHM,
        checked: 1 + h.tensors.len(),
        bytes: f.file_len() as u64,
        mismatches: vec![],
    };
    let head_rec = h.get(GGUF_HEADER_KEY).and_then(Value::as_str).unwrap_or_default();
    report.mismatches.extend(compare("header".into(), head_rec, gguf_header_checksum(&f.bytes()[..h.data_start], &ranges)));
    if recorded.len() != h.tensors.len() {
        report.mismatches.push(mismatch(
            GGUF_TENSORS_KEY,
            format!("{} checksums recorded for {} tensors", recorded.len(), h.tensors.len()),
        ));
    }
    let mut bad: Vec<(usize, Mismatch)> = h
        .tensors
        .par_iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let rec = recorded.get(i)?; // a short list is reported above
            let found = checksum(f.tensor_bytes(t));
            f.release(t);
            compare(format!("tensor {}", t.name), rec, found).map(|m| (i, m))
        })
        .collect();
    bad.sort_by_key(|(i, _)| *i);
    report.mismatches.extend(bad.into_iter().map(|(_, m)| m));
    // padding between tensors (and after the last) is zero, and nothing follows it
    let data = &f.bytes()[h.data_start..];
    let mut pos = 0usize;
    let mut dirty = None;
    let mut end = 0usize;
    for t in &h.tensors {
        let start = t.offset as usize;
        if data[pos..start].iter().any(|&b| b != 0) {
            dirty.get_or_insert(format!("non-zero padding before tensor {}", t.name));
        }
        pos = start + t.nbytes();
        end = (start + t.nbytes()).div_ceil(h.alignment) * h.alignment;
    }
    if end > data.len() {
        dirty.get_or_insert("the padding after the last tensor is cut off".to_string());
    } else {
        if data[pos..end].iter().any(|&b| b != 0) {
            dirty.get_or_insert("non-zero padding after the last tensor".to_string());
        }
        if end < data.len() {
            dirty.get_or_insert(format!("{} bytes follow the last tensor", data.len() - end));
        }
    }
    report.mismatches.extend(dirty.map(|d| mismatch("padding", d)));
    Ok(report)
}

/// What an MLX index records under `metadata.ouro_quant`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct MlxRecord {
    pub algorithm: String,
    /// File name -> checksum of its bytes.
    pub files: BTreeMap<String, String>,
    /// Tensor name -> checksum of its data bytes.
    pub tensors: BTreeMap<String, String>,
}

/// The checksum of a whole file, read in 8 MiB pieces.
pub fn file_checksum(path: &Path) -> Result<Checksum> {
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = Checksummer::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// Checks an MLX directory against the checksums recorded in its index.
pub fn verify_mlx(dir: &Path) -> Result<VerifyReport> {
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(Error::file(dir, "no model.safetensors.index.json: not an MLX directory written by ouro-quant"));
    }
    let text = std::fs::read_to_string(&index_path).at(&index_path)?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&index_path, format!("not valid JSON: {e}")))?;
    let Some(rec) = index.get("metadata").and_then(|m| m.get(MLX_INDEX_KEY)) else {
        return Err(Error::file(
            &index_path,
            format!("no recorded checksums (`metadata.{MLX_INDEX_KEY}`): the directory was not written by ouro-quant 0.1 or later"),
        ));
    };
    let rec: MlxRecord = serde_json::from_value(rec.clone())
        .map_err(|e| Error::file(&index_path, format!("`metadata.{MLX_INDEX_KEY}` is malformed: {e}")))?;
    if rec.algorithm != ALGORITHM {
        return Err(Error::file(&index_path, format!("checksum algorithm `{}` is not supported (only {ALGORITHM})", rec.algorithm)));
    }
    let weight_map = crate::checkpoint::parse_shard_index(&text, &index_path)?;
    let mut report = VerifyReport {
        path: dir.to_path_buf(),
        format: "mlx",
        algorithm: ALGORITHM,
        checked: 0,
        bytes: 0,
        mismatches: vec![],
    };
    // every file: whole-file checksum
    let mut damaged = Vec::new();
    for (name, recorded) in &rec.files {
        report.checked += 1;
        let p = dir.join(name);
        if !crate::checkpoint::is_plain_file_name(name) {
            report.mismatches.push(mismatch(format!("file {name}"), "recorded name is not a plain file name"));
            continue;
        }
        if !p.is_file() {
            report.mismatches.push(mismatch(format!("file {name}"), "missing"));
            continue;
        }
        report.bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        if let Some(m) = compare(format!("file {name}"), recorded, file_checksum(&p)?) {
            report.mismatches.push(m);
            damaged.push(name.clone());
        }
    }
    // every weight file the loaders would read is recorded
    let mut present: Vec<String> = std::fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    present.sort();
    for n in &present {
        if !rec.files.contains_key(n) {
            report.mismatches.push(mismatch(format!("file {n}"), "not recorded (a weight file mlx_lm would load)"));
        }
    }
    // A damaged shard is traced to its tensors; the index and the shards agree on the tensor set.
    let mut shards: Vec<&String> = weight_map.values().collect();
    shards.sort();
    shards.dedup();
    for shard in &shards {
        if !rec.files.contains_key(shard.as_str()) && !dir.join(shard).is_file() {
            report.mismatches.push(mismatch(format!("file {shard}"), "named by the index but missing"));
        }
    }
    for name in rec.tensors.keys() {
        if !weight_map.contains_key(name) {
            report.mismatches.push(mismatch(format!("tensor {name}"), "recorded but absent from the index"));
        }
    }
    for shard in damaged.iter().filter(|n| shards.contains(n)) {
        let p = dir.join(shard);
        let f = match SafetensorsFile::open(&p) {
            Ok(f) => f,
            Err(e) => {
                report.mismatches.push(mismatch(format!("file {shard}"), e.to_string()));
                continue;
            }
        };
        let bad: Vec<Mismatch> = f
            .tensors()
            .par_iter()
            .filter_map(|t| {
                let found = checksum(f.bytes(&t.name).expect("listed tensor"));
                f.release(&t.name);
                match rec.tensors.get(&t.name) {
                    Some(r) => compare(format!("tensor {}", t.name), r, found),
                    None => Some(mismatch(format!("tensor {}", t.name), format!("in {shard} but not recorded"))),
                }
            })
            .collect();
        report.mismatches.extend(bad);
    }
    Ok(report)
}

/// Checks a GGUF file or an MLX directory.
pub fn verify(path: &Path) -> Result<VerifyReport> {
    if path.is_dir() {
        verify_mlx(path)
    } else {
        verify_gguf(path)
    }
}
