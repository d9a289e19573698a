//! The conversion pipeline: checkpoint -> per-tensor plan -> stream (rows quantized in parallel)
//! -> temporary file beside the target -> re-read and verified -> renamed into place.
//!
//! Memory stays at a few row chunks: each tensor is read from the memory-mapped safetensors in
//! chunks of rows, widened to f32, reordered where the format needs it, quantized row by row in
//! parallel and appended in order, so the bytes never depend on the thread count.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::checkpoint::{decode_f32, Checkpoint};
use crate::error::{Error, IoContext, Result};
use crate::gguf::arch::{self, RowOrder};
use crate::gguf::file::{GgufFile, Value, Writer};
use crate::gguf::mix::{requires_imatrix, tensor_type_with, FileType, TypeOverride};
use crate::imatrix::{importance_for, ImatrixInput};
use crate::gguf::tokenizer::tokenizer_metadata;
use crate::output::{Checksum, Checksummer, PendingOutput};
use crate::quant::ggml::GgmlType;
use crate::quant::{has_quantizer, quantize_row};

/// Options of a GGUF conversion.
#[derive(Debug, Clone)]
pub struct GgufOptions {
    pub file_type: FileType,
    pub overrides: Vec<TypeOverride>,
    pub force: bool,
    /// Importance data (`--imatrix`), used as llama-quantize uses it.
    pub imatrix: Option<ImatrixInput>,
}

/// One output tensor and where it comes from.
#[derive(Debug, Clone, Serialize)]
pub struct TensorPlan {
    pub hf_name: String,
    pub gguf_name: String,
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Whether the tensor is quantized with an importance vector.
    pub imatrix: bool,
    #[serde(skip)]
    pub row_order: RowOrder,
}

/// Whether ggml's quantizer for `ty` uses an importance vector (F16, BF16 and Q8_0 ignore it).
fn uses_importance(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0)
}

/// What a conversion did.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertSummary {
    pub output: PathBuf,
    pub file_type: String,
    pub bytes: u64,
    pub parameters: u64,
    pub bits_per_weight: f64,
    pub input_bytes: u64,
    pub seconds: f64,
    pub input_gb_per_s: f64,
    pub tensors: usize,
    pub source_sha256: String,
    /// How many tensors got each type.
    pub types: Vec<(String, usize)>,
}

/// The exact size of the GGUF file [`convert_gguf`] would write: the header with every key
/// (checksums and the source hash at their final lengths), then each tensor padded to the
/// alignment.
pub fn gguf_file_bytes(ck: &Checkpoint, opts: &GgufOptions) -> Result<u64> {
    let plan = plan_gguf(ck, opts)?;
    let mut kvs = metadata(ck, opts, HASH_PLACEHOLDER)?;
    kvs.extend(crate::verify::gguf_placeholder_kvs(plan.len()));
    let specs: Vec<(String, Vec<usize>, GgmlType)> = plan.iter().map(|p| (p.gguf_name.clone(), p.shape.clone(), p.ggml_type)).collect();
    let align = kvs
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u32())
        .map_or(crate::gguf::file::DEFAULT_ALIGNMENT, |a| a as usize);
    let (head, infos) = crate::gguf::file::header_bytes(&kvs, &specs, align);
    Ok(head.len() as u64 + infos.iter().map(|i| i.nbytes().div_ceil(align) * align).sum::<usize>() as u64)
}

/// The per-tensor types a conversion would use.
pub fn plan_gguf(ck: &Checkpoint, opts: &GgufOptions) -> Result<Vec<TensorPlan>> {
    let cfg = &ck.config;
    let mut plan = vec![];
    // An override must change something: one that matches no tensor, or only tensors that are never
    // quantized (norms, 1-D), is a mistake to say rather than a no-op to hide.
    for o in &opts.overrides {
        let map = arch::tensor_map(cfg);
        let matched: Vec<&arch::MappedTensor> = map.iter().filter(|m| o.pattern.is_match(&m.gguf_name)).collect();
        let quantizable = |m: &&arch::MappedTensor| {
            ck.tensor(&m.hf_name).is_ok_and(|t| t.shape().len() >= 2) && !m.gguf_name.contains("_norm.weight")
        };
        if matched.is_empty() {
            return Err(Error::Usage(format!(
                "--type-override {}={}: the pattern matches no tensor (GGUF names, e.g. blk.0.attn_v.weight, ffn_down, output.weight)",
                o.pattern.as_str(),
                o.ty
            )));
        }
        if !matched.iter().any(quantizable) {
            return Err(Error::Usage(format!(
                "--type-override {}={}: the pattern matches only tensors that stay F32 ({}...): norms and other 1-D tensors are never quantized, as in llama-quantize",
                o.pattern.as_str(),
                o.ty,
                matched[0].gguf_name
            )));
        }
    }
    for m in arch::tensor_map(cfg) {
        let t = ck.tensor(&m.hf_name)?;
        let ty = tensor_type_with(opts.file_type, cfg, &m.gguf_name, t.shape(), &opts.overrides, opts.imatrix.is_some());
        if !has_quantizer(ty) {
            return Err(Error::Usage(format!(
                "tensor {} would be {ty}, which this version cannot write yet",
                m.gguf_name
            )));
        }
        let cols = *t.shape().last().unwrap_or(&1);
        let imatrix = match &opts.imatrix {
            Some(im) if uses_importance(ty) => importance_for(im, &m.gguf_name, cols)?.is_some(),
            _ => false,
        };
        if !imatrix && ty.requires_importance() && !requires_imatrix(opts.file_type, &m.gguf_name, ty) {
            // (a --type-override, or the embedding/output that llama-quantize exempts from its
            // check): ggml's quantizer itself cannot make this type without importance data
            return Err(match &opts.imatrix {
                None => Error::Usage(format!(
                    "tensor {} would be {ty}, which ggml quantizes only with an importance vector: add --imatrix FILE (`ouro-quant imatrix`) or choose another type for it",
                    m.gguf_name
                )),
                Some(im) => Error::tensor(&im.path, &m.gguf_name, format!("missing: {ty} is quantized only with importance data for the tensor")),
            });
        }
        if !imatrix && requires_imatrix(opts.file_type, &m.gguf_name, ty) {
            return Err(match &opts.imatrix {
                None => Error::Usage(format!(
                    "--type {}: its {ty} tensors need an importance matrix, as llama-quantize requires (without one the result is garbage): make one with `ouro-quant imatrix MODEL --text CALIBRATION.txt -o imatrix.gguf` and add --imatrix imatrix.gguf",
                    opts.file_type.name()
                )),
                Some(im) => Error::tensor(
                    &im.path,
                    &m.gguf_name,
                    format!("missing: a {} file needs importance data for every {ty} tensor (llama-quantize refuses too)", opts.file_type.name()),
                ),
            });
        }
        plan.push(TensorPlan {
            hf_name: m.hf_name,
            gguf_name: m.gguf_name,
            shape: t.shape().to_vec(),
            ggml_type: ty,
            imatrix,
            row_order: m.row_order,
        });
    }
    Ok(plan)
}

/// A placeholder of the final hash's length, patched in place once the hash is known.
const HASH_PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// All metadata of the output file.
fn metadata(ck: &Checkpoint, opts: &GgufOptions, source_hash: &str) -> Result<Vec<(String, Value)>> {
    let cfg = &ck.config;
    let gate_w = ck.tensor("model.early_exit_gate.weight")?.to_f32();
    let gate_b = ck.tensor("model.early_exit_gate.bias")?.to_f32()[0];
    let name = cfg
        .raw
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| ck.folder_name());
    let mut kv = vec![
        ("general.architecture".to_string(), Value::Str(arch::ARCH.into())),
        ("general.name".to_string(), Value::Str(name)),
        ("general.file_type".to_string(), Value::U32(opts.file_type.id())),
        ("general.quantization_version".to_string(), Value::U32(2)),
    ];
    kv.extend(arch::arch_metadata(cfg, &gate_w, gate_b));
    let tj = ck
        .tokenizer
        .tokenizer_json
        .as_ref()
        .ok_or_else(|| Error::file(&ck.dir, "no tokenizer.json: a GGUF file must carry the tokenizer"))?;
    let (tok_kv, _) = tokenizer_metadata(tj, cfg.vocab_size, ck.tokenizer.config_with_template().as_ref())?;
    kv.extend(tok_kv);
    if let Some(im) = &opts.imatrix {
        // what llama-quantize records (its values cut to 127 bytes)
        let cut = |s: &str| -> String {
            let mut end = s.len().min(127);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_string()
        };
        kv.push(("quantize.imatrix.file".into(), Value::Str(cut(&im.path.display().to_string()))));
        if let Some(d) = im.matrix.datasets.first() {
            kv.push(("quantize.imatrix.dataset".into(), Value::Str(cut(d))));
        }
        kv.push(("quantize.imatrix.entries_count".into(), Value::U32(im.matrix.entries.len() as u32)));
        if im.matrix.chunk_count > 0 {
            kv.push(("quantize.imatrix.chunks_count".into(), Value::U32(im.matrix.chunk_count)));
        }
    }
    let overrides: Vec<String> = opts
        .overrides
        .iter()
        .map(|o| format!("{}={}", o.pattern.as_str(), o.ty))
        .collect();
    kv.push(("ouro_quant.version".into(), Value::Str(env!("CARGO_PKG_VERSION").into())));
    kv.push((
        "ouro_quant.options".into(),
        Value::Str(
            format!(
                "--type {} {}{}",
                opts.file_type.name(),
                overrides.iter().map(|o| format!("--type-override {o} ")).collect::<String>(),
                opts.imatrix.as_ref().map(|im| im.options()).unwrap_or_default()
            )
            .trim()
            .to_string(),
        ),
    ));
    kv.push(("ouro_quant.source.sha256".into(), Value::Str(source_hash.into())));
    kv.push((
        "ouro_quant.corrections".into(),
        Value::strings(cfg.corrections.iter().map(|c| format!("{}: {} -> {}", c.key, c.found, c.corrected))),
    ));
    Ok(kv)
}

/// SHA-256 of the weights: of `model.safetensors` itself for a single file (what `sha256sum`
/// prints), or of the `sha256sum`-style listing (`<hash>  <name>` lines, names sorted) for shards.
/// Read with plain buffered reads so that hashing does not grow the resident set.
pub fn source_sha256(ck: &Checkpoint) -> Result<String> {
    use std::io::Read;
    let mut files: Vec<&Path> = ck.weights.files().iter().map(|f| f.path()).collect();
    files.sort_by_key(|p| p.file_name().map(|n| n.to_owned()));
    let mut buf = vec![0u8; 8 << 20];
    let mut listing = String::new();
    let mut single = String::new();
    for p in &files {
        let mut h = Sha256::new();
        let mut f = std::fs::File::open(p).at(p)?;
        loop {
            let n = f.read(&mut buf).at(p)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        single = hex(&h.finalize());
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        listing.push_str(&format!("{single}  {name}\n"));
    }
    Ok(if files.len() == 1 { single } else { hex(&Sha256::digest(listing.as_bytes())) })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Rows converted per step (bounded memory; enough work to spread over threads).
const CHUNK_ROWS: usize = 512;

/// Converts `ck` into a GGUF file at `out`. `progress(done_bytes, total_bytes, tensor)`.
pub fn convert_gguf(
    ck: &Checkpoint,
    opts: &GgufOptions,
    out: &Path,
    progress: &(dyn Fn(u64, u64, &str) + Sync),
) -> Result<ConvertSummary> {
    let start = Instant::now();
    let plan = plan_gguf(ck, opts)?;
    let pending = PendingOutput::file(out, opts.force)?;
    let mut kvs = metadata(ck, opts, HASH_PLACEHOLDER)?;
    kvs.extend(crate::verify::gguf_placeholder_kvs(plan.len()));
    let specs: Vec<(String, Vec<usize>, GgmlType)> =
        plan.iter().map(|p| (p.gguf_name.clone(), p.shape.clone(), p.ggml_type)).collect();
    let total_in: u64 = plan.iter().map(|p| ck.tensor(&p.hf_name).map(|t| t.bytes.len() as u64).unwrap_or(0)).sum();

    // Hash the sources on one thread while the others convert.
    let mut header_len = 0usize;
    let (hash, written) = rayon::join(
        || source_sha256(ck),
        || -> Result<Vec<Checksum>> {
            let mut w = Writer::create(pending.path(), &kvs, &specs)?;
            header_len = w.header_len();
            let mut sums = Vec::with_capacity(plan.len());
            let mut done = 0u64;
            for p in &plan {
                let t = ck.tensor(&p.hf_name)?;
                let cols = *p.shape.last().expect("shape");
                let rows = t.info.numel() / cols;
                let es = t.dtype().size();
                let row_out = p.ggml_type.row_bytes(cols);
                let importance = match (&opts.imatrix, p.imatrix) {
                    (Some(im), true) => importance_for(im, &p.gguf_name, cols)?,
                    _ => None,
                };
                let mut h = Checksummer::new();
                let mut buf = vec![0u8; CHUNK_ROWS.min(rows) * row_out];
                for r0 in (0..rows).step_by(CHUNK_ROWS) {
                    let n = CHUNK_ROWS.min(rows - r0);
                    let outb = &mut buf[..n * row_out];
                    outb.par_chunks_mut(row_out).enumerate().try_for_each(|(k, dst)| {
                        let r = r0 + k;
                        let src = p.row_order.source_row(r, rows);
                        let mut row = vec![0f32; cols];
                        decode_f32(t.dtype(), &t.bytes[src * cols * es..(src + 1) * cols * es], &mut row);
                        if let Some((c, _)) = crate::checkpoint::first_non_finite(&row) {
                            return Err(Error::tensor(
                                t.file,
                                &p.hf_name,
                                format!("non-finite value {} at row {src}, column {c}", row[c]),
                            ));
                        }
                        let mut q = Vec::with_capacity(row_out);
                        if !quantize_row(p.ggml_type, &row, importance.as_deref(), &mut q) || q.len() != dst.len() {
                            // the plan refuses this before work starts; never write a short row
                            return Err(Error::tensor(t.file, &p.hf_name, format!("cannot quantize to {} here", p.ggml_type)));
                        }
                        dst.copy_from_slice(&q);
                        Ok(())
                    })?;
                    w.write(outb)?;
                    h.update(&*outb);
                    done += (n * cols * es) as u64;
                    progress(done, total_in, &p.gguf_name);
                }
                sums.push(h.finish());
                ck.weights.release(&p.hf_name);
            }
            w.finish()?;
            Ok(sums)
        },
    );
    let sums = written?;
    let hash = hash?;
    patch_hash(pending.path(), header_len, &hash)?;
    crate::verify::record_gguf(pending.path(), &sums)?;
    verify(pending.path(), &plan, &sums, &hash)?;
    let bytes = std::fs::metadata(pending.path()).at(pending.path())?.len();
    let output = pending.commit()?;
    let secs = start.elapsed().as_secs_f64();
    let params = ck.config.parameter_count();
    let mut types: Vec<(String, usize)> = vec![];
    for p in &plan {
        match types.iter_mut().find(|(n, _)| n == p.ggml_type.name()) {
            Some(e) => e.1 += 1,
            None => types.push((p.ggml_type.name().to_string(), 1)),
        }
    }
    Ok(ConvertSummary {
        output,
        file_type: opts.file_type.name().into(),
        bytes,
        parameters: params,
        bits_per_weight: bytes as f64 * 8.0 / params as f64,
        input_bytes: total_in,
        seconds: secs,
        input_gb_per_s: total_in as f64 / secs / 1e9,
        tensors: plan.len(),
        source_sha256: hash,
        types,
    })
}

/// Overwrites the hash placeholder in the header (same length, so no offset moves).
fn patch_hash(path: &Path, header_len: usize, hash: &str) -> Result<()> {
    use std::io::Read;
    let mut head = vec![0u8; header_len];
    std::fs::File::open(path).at(path)?.read_exact(&mut head).at(path)?;
    let needle = HASH_PLACEHOLDER.as_bytes();
    let pos = head
        .windows(needle.len())
        .position(|w| w == needle)
        .ok_or_else(|| Error::file(path, "internal: hash placeholder not found"))?;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).at(path)?;
    f.seek(SeekFrom::Start(pos as u64)).at(path)?;
    // synced with the checksums that [`crate::verify::record_gguf`] patches in next
    f.write_all(hash.as_bytes()).at(path)
}

/// Re-reads the written file with the strict reader, checks it against the plan, and checks every
/// byte against the checksums taken while writing (recorded in the file by [`crate::verify::record_gguf`]).
fn verify(path: &Path, plan: &[TensorPlan], sums: &[Checksum], hash: &str) -> Result<()> {
    let f = GgufFile::open(path)?;
    if f.header.tensors.len() != plan.len() {
        return Err(Error::file(path, format!("verification: {} tensors written, {} planned", f.header.tensors.len(), plan.len())));
    }
    if f.header.get("ouro_quant.source.sha256").and_then(|v| v.as_str()) != Some(hash) {
        return Err(Error::file(path, "verification: provenance hash was not written"));
    }
    for (t, p) in f.header.tensors.iter().zip(plan) {
        if t.name != p.gguf_name || t.shape != p.shape || t.ggml_type != p.ggml_type {
            return Err(Error::tensor(path, &t.name, "verification failed: the header read back differs from the plan"));
        }
    }
    let recorded = f.header.get(crate::verify::GGUF_TENSORS_KEY).and_then(|v| v.as_array()).unwrap_or(&[]);
    for ((t, s), r) in f.header.tensors.iter().zip(sums).zip(recorded) {
        if r.as_str() != Some(crate::verify::hex(*s).as_str()) {
            return Err(Error::tensor(path, &t.name, "verification failed: its recorded checksum differs from the one taken while writing"));
        }
    }
    drop(f);
    let report = crate::verify::verify_gguf(path)?;
    if let Some(m) = report.mismatches.first() {
        return Err(Error::file(path, format!("verification failed: {}: {} (the bytes read back differ from those written)", m.item, m.problem)));
    }
    Ok(())
}
