//! Importance-matrix files as llama.cpp writes and reads them (its `tools/imatrix/imatrix.cpp` and
//! `common/imatrix-loader.cpp`; the layout is recorded in `formats/imatrix.md`):
//!
//! - **GGUF** (`general.type = imatrix`): keys `imatrix.datasets` (string array),
//!   `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per weight, in name order, two F32
//!   tensors `<weight>.in_sum2` `[n_cols, 1]` (sums of squared inputs per input column) and
//!   `<weight>.counts` `[1, 1]` (rows summed). Raw sums: the importance is `in_sum2 / counts`.
//! - **legacy `.dat`** (`--output-format dat`), little-endian: `i32` entries; per entry `i32` name
//!   length, the name, `i32 ncall`, `i32 nval`, `nval` f32 holding `(sum / count) * ncall`; then
//!   `i32` chunk count and `i32` length + the dataset name. The importance is `value / ncall`.
//!
//! A file is read as GGUF when it parses as GGUF, else as `.dat`, as llama.cpp's loader does.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::gguf::file::{GgufFile, Value, Writer};
use crate::output::PendingOutput;
use crate::quant::ggml::GgmlType;

pub const KEY_DATASETS: &str = "imatrix.datasets";
pub const KEY_CHUNK_COUNT: &str = "imatrix.chunk_count";
pub const KEY_CHUNK_SIZE: &str = "imatrix.chunk_size";
/// Our own record of how the sums were weighted (`loops`, `exit:q`); llama.cpp ignores it.
pub const KEY_WEIGHTING: &str = "ouro_quant.imatrix.weighting";

/// The two layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gguf,
    Dat,
}

/// One weight's statistics: sums of squared inputs per input column and the rows summed.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub sums: Vec<f32>,
    /// Rows summed (for `.dat`: the call count `ncall`, the sums being `mean * ncall`).
    pub count: f64,
}

/// An importance matrix as stored.
#[derive(Debug, Clone)]
pub struct Imatrix {
    /// GGUF tensor name of the weight -> statistics.
    pub entries: BTreeMap<String, Entry>,
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    /// Tokens per chunk (0 in a `.dat` file, which does not record it).
    pub chunk_size: u32,
    pub format: Format,
    /// How the sums were weighted, when the file says (ours do).
    pub weighting: Option<String>,
}

impl Imatrix {
    /// The importance vector of a weight as llama-quantize derives it: `in_sum2 / counts` for
    /// GGUF (all ones where nothing was counted), `value / ncall` for `.dat`.
    pub fn weights(&self, name: &str) -> Option<Vec<f32>> {
        let e = self.entries.get(name)?;
        Some(if e.count > 0.0 {
            let c = e.count as f32;
            e.sums.iter().map(|s| s / c).collect()
        } else if self.format == Format::Gguf {
            vec![1.0; e.sums.len()]
        } else {
            e.sums.clone()
        })
    }

    /// Reads a file in either layout.
    pub fn read(path: &Path) -> Result<Imatrix> {
        let head = {
            use std::io::Read;
            let mut b = [0u8; 4];
            let mut f = std::fs::File::open(path).at(path)?;
            let n = f.read(&mut b).at(path)?;
            b[..n].to_vec()
        };
        if head == b"GGUF" {
            Self::read_gguf(path)
        } else {
            Self::read_dat(path)
        }
    }

    fn read_gguf(path: &Path) -> Result<Imatrix> {
        let f = GgufFile::open(path)?;
        let h = &f.header;
        if h.tensors.is_empty() {
            return Err(Error::file(path, "no data: the imatrix file holds no tensors"));
        }
        if let Some(t) = h.get("general.type").and_then(|v| v.as_str()) {
            if t != "imatrix" {
                return Err(Error::config(path, "general.type", format!("`{t}`: this is not an importance matrix (llama-imatrix writes `imatrix`)")));
            }
        }
        let need = |k: &str| h.get(k).ok_or_else(|| Error::config(path, k, "missing: llama-quantize refuses an imatrix file without its metadata"));
        let datasets = match need(KEY_DATASETS)? {
            Value::Array(_, items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| Error::config(path, KEY_DATASETS, "must be an array of strings")))
                .collect::<Result<Vec<_>>>()?,
            _ => return Err(Error::config(path, KEY_DATASETS, "must be an array of strings")),
        };
        let u32_of = |k: &str| need(k)?.as_u32().ok_or_else(|| Error::config(path, k, "must be an unsigned 32-bit integer"));
        let chunk_count = u32_of(KEY_CHUNK_COUNT)?;
        let chunk_size = u32_of(KEY_CHUNK_SIZE)?;
        let mut sums: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let mut counts: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        for t in &h.tensors {
            let (base, is_sum) = if let Some(b) = t.name.strip_suffix(".in_sum2") {
                (b, true)
            } else if let Some(b) = t.name.strip_suffix(".counts") {
                (b, false)
            } else {
                continue;
            };
            if t.ggml_type != GgmlType::F32 {
                return Err(Error::tensor(path, &t.name, format!("is {}: sums and counts must be F32", t.ggml_type)));
            }
            let v: Vec<f32> = f.tensor_bytes(t).chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::tensor(path, &t.name, format!("non-finite value {} at element {i}", v[i])));
            }
            if is_sum { sums.insert(base.to_string(), v) } else { counts.insert(base.to_string(), v) };
        }
        let mut entries = BTreeMap::new();
        for (name, s) in sums {
            let c = counts.remove(&name).ok_or_else(|| Error::tensor(path, format!("{name}.counts"), "missing: every in_sum2 needs its counts"))?;
            if c.len() != 1 {
                return Err(Error::tensor(
                    path,
                    format!("{name}.counts"),
                    format!("{} counts: one per weight matrix; per-expert (MoE) matrices are not part of an Ouro model", c.len()),
                ));
            }
            if c[0] < 0.0 {
                return Err(Error::tensor(path, format!("{name}.counts"), format!("negative count {}", c[0])));
            }
            entries.insert(name, Entry { sums: s, count: c[0].round() as f64 });
        }
        if let Some(name) = counts.keys().next() {
            return Err(Error::tensor(path, format!("{name}.in_sum2"), "missing: these counts have no sums"));
        }
        if entries.is_empty() {
            return Err(Error::file(path, "no `<weight>.in_sum2` tensors: not an importance matrix"));
        }
        let weighting = h.get(KEY_WEIGHTING).and_then(|v| v.as_str()).map(str::to_string);
        Ok(Imatrix { entries, datasets, chunk_count, chunk_size, format: Format::Gguf, weighting })
    }

    fn read_dat(path: &Path) -> Result<Imatrix> {
        let b = std::fs::read(path).at(path)?;
        let mut r = Cursor { b: &b, at: 0, path };
        let n = r.i32("the entry count")?;
        if n < 1 {
            return Err(Error::file(path, format!("{n} entries: neither a GGUF imatrix nor a legacy .dat one with data")));
        }
        let mut entries = BTreeMap::new();
        for i in 0..n {
            let len = r.i32("a name length")?;
            if !(1..=4096).contains(&len) {
                return Err(Error::file(path, format!("entry {}: name length {len} (at byte {}): not an imatrix .dat file", i + 1, r.at - 4)));
            }
            let name = String::from_utf8(r.take(len as usize, "a name")?.to_vec())
                .map_err(|_| Error::file(path, format!("entry {}: the name is not UTF-8", i + 1)))?;
            let ncall = r.i32("ncall")?;
            let nval = r.i32("nval")?;
            if nval < 1 || nval > (1 << 24) {
                return Err(Error::tensor(path, &name, format!("{nval} values: not an imatrix .dat file")));
            }
            let sums: Vec<f32> = r.take(nval as usize * 4, "the values")?.chunks_exact(4).map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect();
            if let Some(j) = sums.iter().position(|x| !x.is_finite()) {
                return Err(Error::tensor(path, &name, format!("non-finite value {} at element {j}", sums[j])));
            }
            if ncall < 0 {
                return Err(Error::tensor(path, &name, format!("negative call count {ncall}")));
            }
            if entries.insert(name.clone(), Entry { sums, count: ncall as f64 }).is_some() {
                return Err(Error::tensor(path, &name, "appears twice"));
            }
        }
        let (mut chunk_count, mut datasets) = (0u32, vec![]);
        if r.at < b.len() {
            chunk_count = r.i32("the chunk count")?.max(0) as u32;
            if r.at < b.len() {
                let len = r.i32("the dataset name length")?;
                if len > 0 {
                    let d = r.take(len as usize, "the dataset name")?;
                    datasets.push(String::from_utf8_lossy(d).into_owned());
                }
            }
        }
        if r.at != b.len() {
            return Err(Error::file(path, format!("{} bytes after the dataset name: not an imatrix .dat file", b.len() - r.at)));
        }
        Ok(Imatrix { entries, datasets, chunk_count, chunk_size: 0, format: Format::Dat, weighting: None })
    }

    /// Writes the file through a pending output (temporary file beside `target`, read back and
    /// compared, then renamed); returns the final path.
    pub fn write(&self, target: &Path, format: Format, force: bool) -> Result<PathBuf> {
        let pending = PendingOutput::file(target, force)?;
        match format {
            Format::Gguf => self.write_gguf(pending.path())?,
            Format::Dat => self.write_dat(pending.path())?,
        }
        // read back: what a reader gets must be what we hold
        let back = Imatrix::read(pending.path())?;
        let written: Vec<(&String, &Entry)> = self.entries.iter().filter(|(_, e)| format == Format::Gguf || e.count > 0.0).collect();
        let same = back.entries.len() == written.len()
            && back.entries.iter().zip(written).all(|((a, x), (b, y))| {
                a == b && match format {
                    Format::Gguf => x.sums == y.sums && x.count == y.count.round(),
                    Format::Dat => x.sums.len() == y.sums.len(),
                }
            });
        if !same {
            return Err(Error::file(pending.path(), "verification failed: the importance matrix read back differs from the one written"));
        }
        pending.commit()
    }

    fn write_gguf(&self, path: &Path) -> Result<()> {
        let mut kvs = vec![
            ("general.type".to_string(), Value::Str("imatrix".into())),
            (KEY_DATASETS.to_string(), Value::strings(self.datasets.iter().cloned())),
            (KEY_CHUNK_COUNT.to_string(), Value::U32(self.chunk_count)),
            (KEY_CHUNK_SIZE.to_string(), Value::U32(self.chunk_size)),
            ("ouro_quant.version".to_string(), Value::Str(env!("CARGO_PKG_VERSION").into())),
        ];
        if let Some(w) = &self.weighting {
            kvs.push((KEY_WEIGHTING.to_string(), Value::Str(w.clone())));
        }
        let mut specs = vec![];
        for (name, e) in &self.entries {
            specs.push((format!("{name}.in_sum2"), vec![1, e.sums.len()], GgmlType::F32));
            specs.push((format!("{name}.counts"), vec![1, 1], GgmlType::F32));
        }
        let mut w = Writer::create(path, &kvs, &specs)?;
        for e in self.entries.values() {
            w.write(&e.sums.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
            w.write(&(e.count as f32).to_le_bytes())?;
        }
        w.finish()
    }

    /// The legacy layout: per entry `(sum / count) * ncall` with `ncall = ceil(count / chunk_size)`,
    /// as llama-imatrix's `save_imatrix_legacy` writes it.
    fn write_dat(&self, path: &Path) -> Result<()> {
        let cs = self.chunk_size.max(1) as f64;
        let mut out = Vec::new();
        // entries with nothing counted are left out, as llama-imatrix leaves them out
        let kept: Vec<(&String, &Entry)> = self.entries.iter().filter(|(_, e)| e.count > 0.0).collect();
        out.extend((kept.len() as i32).to_le_bytes());
        for (name, e) in kept {
            out.extend((name.len() as i32).to_le_bytes());
            out.extend(name.as_bytes());
            let ncall = (e.count / cs).ceil() as i32;
            out.extend(ncall.to_le_bytes());
            out.extend((e.sums.len() as i32).to_le_bytes());
            for &s in &e.sums {
                out.extend(((s / e.count as f32) * ncall as f32).to_le_bytes());
            }
        }
        out.extend((self.chunk_count as i32).to_le_bytes());
        let d = self.datasets.last().map(String::as_str).unwrap_or("");
        out.extend((d.len() as i32).to_le_bytes());
        out.extend(d.as_bytes());
        let mut f = std::fs::File::create(path).at(path)?;
        f.write_all(&out).at(path)?;
        f.sync_all().at(path)
    }
}

/// A bounds-checked little-endian reader over a `.dat` file.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
            Error::file(self.path, format!("truncated at byte {} while reading {what}: neither a GGUF imatrix nor a complete .dat one", self.at))
        })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        let s = self.take(4, what)?;
        Ok(i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Imatrix {
        let mut entries = BTreeMap::new();
        entries.insert("blk.0.attn_q.weight".to_string(), Entry { sums: vec![4.0, 8.0, 0.5, 2.0], count: 8.0 });
        entries.insert("blk.0.ffn_down.weight".to_string(), Entry { sums: vec![1.0, 3.0], count: 0.0 });
        Imatrix { entries, datasets: vec!["calib.txt".into()], chunk_count: 2, chunk_size: 4, format: Format::Gguf, weighting: Some("loops".into()) }
    }

    /// Both layouts give llama-quantize's importance: GGUF `in_sum2 / counts` (ones where nothing
    /// was counted), `.dat` `(sum / count) * ncall` divided back by `ncall`.
    #[test]
    fn both_layouts_give_the_same_importance() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        let g = m.write(&dir.path().join("m.gguf"), Format::Gguf, false).unwrap();
        let d = m.write(&dir.path().join("m.dat"), Format::Dat, false).unwrap();
        let (g, d) = (Imatrix::read(&g).unwrap(), Imatrix::read(&d).unwrap());
        assert_eq!((g.format, d.format), (Format::Gguf, Format::Dat));
        assert_eq!(g.weights("blk.0.attn_q.weight").unwrap(), vec![0.5, 1.0, 0.0625, 0.25]);
        assert_eq!(d.weights("blk.0.attn_q.weight").unwrap(), vec![0.5, 1.0, 0.0625, 0.25]);
        assert_eq!(g.weights("blk.0.ffn_down.weight").unwrap(), vec![1.0, 1.0]);
        // nothing counted: llama-imatrix's .dat leaves the entry out
        assert_eq!(d.weights("blk.0.ffn_down.weight"), None);
        // ncall = ceil(8 / 4) = 2: the stored values are the means times 2
        assert_eq!(d.entries["blk.0.attn_q.weight"].count, 2.0);
        assert_eq!(d.entries["blk.0.attn_q.weight"].sums, vec![1.0, 2.0, 0.125, 0.5]);
        assert_eq!((g.chunk_count, g.chunk_size, d.chunk_count), (2, 4, 2));
        assert_eq!((g.datasets.clone(), d.datasets.clone()), (vec!["calib.txt".to_string()], vec!["calib.txt".to_string()]));
        assert_eq!(g.weighting.as_deref(), Some("loops"));
    }

    #[test]
    fn truncated_and_foreign_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = sample().write(&dir.path().join("m.dat"), Format::Dat, false).unwrap();
        let bytes = std::fs::read(&d).unwrap();
        let cut = dir.path().join("cut.dat");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = Imatrix::read(&cut).unwrap_err().to_string();
        assert!(e.contains("cut.dat") && e.contains("truncated"), "{e}");
        let junk = dir.path().join("junk.dat");
        std::fs::write(&junk, b"hello world, not an imatrix").unwrap();
        assert!(Imatrix::read(&junk).is_err());
    }
}
