//! Writes an MLX model directory from an HF checkpoint (see `formats/mlx.md`).
//!
//! Tensors are converted one at a time from the memory-mapped input (rows quantized in parallel,
//! so the bytes never depend on the thread count) and streamed into shards inside a temporary
//! directory beside the target. Every shard is re-opened with the strict safetensors reader and
//! each tensor's checksum compared before the directory is renamed into place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{affine, MlxOptions};
use crate::checkpoint::{decode_f32, Checkpoint};
use crate::error::{Error, IoContext, Result};
use crate::imatrix::{importance_for, ImatrixInput};
use crate::output::{checksum, Checksum, PendingOutput};
use crate::stfile::{DType, SafetensorsFile, TensorSpec, Writer};

/// One source tensor and how it is written.
#[derive(Debug, Clone, Serialize)]
pub struct MlxTensorPlan {
    /// HF tensor name in the checkpoint.
    pub hf_name: String,
    /// Module path (the name without `.weight`) for quantized tensors.
    pub module: String,
    pub shape: Vec<usize>,
    #[serde(serialize_with = "ser_dtype")]
    pub dtype: DType,
    /// `(bits, group_size)`, or `None` to copy the tensor in its dtype.
    pub quant: Option<(u32, usize)>,
    /// Whether the tensor is quantized with an importance vector (`--imatrix` has its entry).
    pub imatrix: bool,
}

fn ser_dtype<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

impl MlxTensorPlan {
    /// The tensors this plan writes, in the order they are written (names sorted).
    pub fn outputs(&self) -> Vec<TensorSpec> {
        match self.quant {
            None => vec![TensorSpec {
                name: self.hf_name.clone(),
                dtype: self.dtype,
                shape: self.shape.clone(),
            }],
            Some((bits, gs)) => {
                let (rows, cols) = (self.shape[0], self.shape[1]);
                let aux = vec![rows, cols / gs];
                vec![
                    TensorSpec { name: format!("{}.biases", self.module), dtype: self.dtype, shape: aux.clone() },
                    TensorSpec { name: format!("{}.scales", self.module), dtype: self.dtype, shape: aux },
                    TensorSpec {
                        name: format!("{}.weight", self.module),
                        dtype: DType::U32,
                        shape: vec![rows, cols * bits as usize / 32],
                    },
                ]
            }
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Serialize)]
pub struct MlxSummary {
    pub output: PathBuf,
    pub bits: Option<u32>,
    pub group_size: usize,
    pub recipe: Option<String>,
    pub bytes: u64,
    pub parameters: u64,
    pub bits_per_weight: f64,
    pub input_bytes: u64,
    pub seconds: f64,
    pub input_gb_per_s: f64,
    pub shards: usize,
    pub quantized_tensors: usize,
    pub float_tensors: usize,
}

/// The per-tensor plan, in output order (HF names sorted).
pub fn plan_mlx(ck: &Checkpoint, opts: &MlxOptions) -> Result<Vec<MlxTensorPlan>> {
    let layers = ck.config.num_hidden_layers;
    let mut plan: Vec<MlxTensorPlan> = crate::checkpoint::expected_tensors(&ck.config)
        .into_iter()
        .map(|e| {
            let t = ck.tensor(&e.name)?;
            let module = e.name.strip_suffix(".weight").unwrap_or(&e.name).to_string();
            let quant = if t.shape().len() == 2 { opts.quant_for(&module, t.shape()[1], layers) } else { None };
            let imatrix = match (&opts.imatrix, quant) {
                (Some(im), Some(_)) => importance(ck, im, &e.name, t.shape()[1])?.is_some(),
                _ => false,
            };
            Ok(MlxTensorPlan {
                hf_name: e.name.clone(),
                module,
                shape: t.shape().to_vec(),
                dtype: t.dtype(),
                quant,
                imatrix,
            })
        })
        .collect::<Result<_>>()?;
    plan.sort_by(|a, b| a.hf_name.cmp(&b.hf_name));
    Ok(plan)
}

/// The importance vector of an HF weight with `cols` columns, looked up by its GGUF name (the
/// name importance matrices use), checked as for GGUF conversion.
fn importance(ck: &Checkpoint, im: &ImatrixInput, hf_name: &str, cols: usize) -> Result<Option<Vec<f32>>> {
    match crate::gguf::arch::gguf_name(&ck.config, hf_name) {
        Some(name) => importance_for(im, &name, cols),
        None => Ok(None),
    }
}

/// The `quantization` section of `config.json`: the top-level settings, an entry for every
/// module whose settings differ, and `false` for modules MLX could quantize but we keep in float.
pub fn quantization_config(plan: &[MlxTensorPlan], opts: &MlxOptions) -> Option<Value> {
    let bits = opts.bits?;
    let mut q = Map::new();
    q.insert("group_size".into(), json!(opts.group_size));
    q.insert("bits".into(), json!(bits));
    q.insert("mode".into(), json!("affine"));
    for p in plan {
        let linear_like = super::is_quantized(&p.hf_name) || p.hf_name == "model.early_exit_gate.weight";
        match p.quant {
            Some((b, g)) if (b, g) != (bits, opts.group_size) => {
                q.insert(p.module.clone(), json!({"group_size": g, "bits": b, "mode": "affine"}));
            }
            None if linear_like => {
                q.insert(p.module.clone(), json!(false));
            }
            _ => {}
        }
    }
    Some(Value::Object(q))
}

/// Rows quantized per step.
const CHUNK_ROWS: usize = 256;

/// Stores f32 values as little-endian `dtype` (bf16/f16 rounded to nearest even, as MLX does).
fn store_floats(dtype: DType, v: &[f32], out: &mut [u8]) {
    match dtype {
        DType::BF16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
            }
        }
        DType::F16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
            }
        }
        _ => {
            for (o, &x) in out.chunks_exact_mut(4).zip(v) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Quantizes a whole tensor: (biases, scales, packed words) as little-endian bytes.
fn quantize_tensor(ck: &Checkpoint, p: &MlxTensorPlan, bits: u32, gs: usize, im: Option<&ImatrixInput>) -> Result<[Vec<u8>; 3]> {
    let t = ck.tensor(&p.hf_name)?;
    let (rows, cols) = (p.shape[0], p.shape[1]);
    let weights = match im {
        Some(im) if p.imatrix => importance(ck, im, &p.hf_name, cols)?,
        _ => None,
    };
    let store: fn(f32) -> f32 = match p.dtype {
        DType::BF16 => |v| half::bf16::from_f32(v).to_f32(),
        DType::F16 => |v| half::f16::from_f32(v).to_f32(),
        _ => |v| v,
    };
    let es = t.dtype().size();
    let wpr = cols * bits as usize / 32;
    let gpr = cols / gs;
    let fb = p.dtype.size();
    let mut words = vec![0u8; rows * wpr * 4];
    let mut scales = vec![0u8; rows * gpr * fb];
    let mut biases = vec![0u8; rows * gpr * fb];
    words
        .par_chunks_mut(wpr * 4 * CHUNK_ROWS)
        .zip(scales.par_chunks_mut(gpr * fb * CHUNK_ROWS))
        .zip(biases.par_chunks_mut(gpr * fb * CHUNK_ROWS))
        .enumerate()
        .try_for_each(|(ci, ((wout, sout), bout))| {
            let mut row = vec![0f32; cols];
            let mut w = vec![0u32; wpr];
            let (mut s, mut b) = (vec![0f32; gpr], vec![0f32; gpr]);
            for k in 0..wout.len() / (wpr * 4) {
                let r = ci * CHUNK_ROWS + k;
                let src = &t.bytes[r * cols * es..(r + 1) * cols * es];
                let non_finite = || {
                    let mut row = vec![0f32; cols];
                    decode_f32(t.dtype(), src, &mut row);
                    let (c, v) = crate::checkpoint::first_non_finite(&row).expect("a non-finite value");
                    Error::tensor(t.file, &p.hf_name, format!("non-finite value {v} at row {r}, column {c}"))
                };
                if let Some(imp) = &weights {
                    decode_f32(t.dtype(), src, &mut row);
                    if !crate::checkpoint::all_finite(&row) {
                        return Err(non_finite());
                    }
                    affine::quantize_row_weighted(&row, imp, bits, gs, store, &mut w, &mut s, &mut b);
                } else if t.dtype() == DType::BF16 {
                    // widened group by group inside the kernel: the row is read once
                    affine::quantize_row_bf16(src, bits, gs, &mut w, &mut s, &mut b).map_err(|_| non_finite())?;
                } else {
                    decode_f32(t.dtype(), src, &mut row);
                    if !crate::checkpoint::all_finite(&row) {
                        return Err(non_finite());
                    }
                    affine::quantize_row(&row, bits, gs, &mut w, &mut s, &mut b);
                }
                for (dst, x) in wout[k * wpr * 4..(k + 1) * wpr * 4].chunks_exact_mut(4).zip(&w) {
                    dst.copy_from_slice(&x.to_le_bytes());
                }
                store_floats(p.dtype, &s, &mut sout[k * gpr * fb..(k + 1) * gpr * fb]);
                store_floats(p.dtype, &b, &mut bout[k * gpr * fb..(k + 1) * gpr * fb]);
            }
            Ok(())
        })?;
    Ok([biases, scales, words])
}

/// Shard file names as mlx-lm writes them.
fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Splits the output tensors into shards of at most `limit` bytes (mlx-lm's `make_shards`).
fn make_shards(specs: &[TensorSpec], limit: u64) -> Vec<Vec<TensorSpec>> {
    let mut shards: Vec<Vec<TensorSpec>> = vec![];
    let mut size = 0u64;
    for s in specs {
        let n = s.nbytes() as u64;
        if shards.is_empty() || size + n > limit {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("one shard").push(s.clone());
        size += n;
    }
    shards
}

/// A model name for cards: `_name_or_path`'s last part, else the
/// checkpoint directory's name.
pub fn model_name(ck: &Checkpoint) -> String {
    if let Some(n) = ck.config.raw.get("_name_or_path").and_then(|v| v.as_str()) {
        if let Some(last) = n.rsplit('/').next().filter(|s| !s.is_empty()) {
            return last.to_string();
        }
    }
    ck.folder_name()
}

/// The default output directory name: `<folder>-<suffix>` (`Ouro-1.4B-4bit`, ...), the folder
/// being the checkpoint's, as for GGUF files.
pub fn default_output_name(ck: &Checkpoint, opts: &MlxOptions) -> String {
    format!("{}-{}", ck.folder_name(), opts.suffix(ck.dtype().name()))
}

/// `config.json` of the output: the source config with the eos correction, the quantization
/// section (twice, as mlx-lm writes it), and our model file, without `auto_map`; keys sorted,
/// 4-space indent.
fn output_config(ck: &Checkpoint, plan: &[MlxTensorPlan], opts: &MlxOptions) -> Result<Vec<u8>> {
    let mut cfg = ck.config.corrected_raw();
    cfg.remove("_name_or_path");
    // `auto_map` points transformers at configuration_ouro.py / modeling_ouro.py, which an MLX
    // directory does not ship; left in, it makes transformers ask to run code that is not there.
    cfg.remove("auto_map");
    if let Some(q) = quantization_config(plan, opts) {
        cfg.insert("quantization".into(), q.clone());
        cfg.insert("quantization_config".into(), q);
    }
    cfg.insert("model_file".into(), json!("ouro.py"));
    let sorted: BTreeMap<String, Value> = cfg.into_iter().collect();
    pretty4(&sorted)
}

fn pretty4<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).map_err(|e| Error::Usage(format!("internal: JSON: {e}")))?;
    Ok(out)
}

/// The model card, in mlx-community's form.
fn model_card(ck: &Checkpoint, opts: &MlxOptions, plan: &[MlxTensorPlan], name: &str, validation: Option<&str>) -> String {
    let base = ck
        .config
        .raw
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| model_name(ck));
    let how = match (opts.bits, opts.recipe) {
        (None, _) => format!("unquantized ({})", ck.dtype().name()),
        (Some(_), Some(r)) => format!(
            "affine quantization, recipe `{}` ({} bits, {} bits for v_proj/down_proj of selected layers and lm_head), group size {}",
            r.name(),
            r.bits().0,
            r.bits().1,
            opts.group_size
        ),
        (Some(b), None) => format!("affine quantization, {b} bits, group size {}", opts.group_size),
    };
    let how = match &opts.imatrix {
        Some(im) => format!(
            "{how}; each group's scale and bias minimise the importance-weighted error (importance matrix `{}`{}{}, used for {} of {} quantized tensors; the files are standard MLX affine tensors)",
            im.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            im.matrix.datasets.first().map(|d| format!(" from `{d}`")).unwrap_or_default(),
            im.matrix.weighting.as_ref().map(|w| format!(", weighting `{w}`")).unwrap_or_default(),
            plan.iter().filter(|p| p.imatrix).count(),
            plan.iter().filter(|p| p.quant.is_some()).count(),
        ),
        None => how,
    };
    let validation = validation.map(str::to_string).unwrap_or_else(|| {
        "Not run at conversion time. Run `ouro-quant validate --reference <bf16 dir> --candidate <this dir> --text <file>` to measure perplexity, KL divergence and exit-gate agreement.".into()
    });
    format!(
        "---\nlibrary_name: mlx\nlicense: apache-2.0\nbase_model: {base}\npipeline_tag: text-generation\nquantized_by: ouro-quant\ntags:\n- mlx\n- ouro\n- looped-language-model\n---\n\n\
# {name}\n\n\
This model was converted to MLX format from [{base}](https://huggingface.co/{base}) using ouro-quant version **{ver}**: {how}.\n\
The norms and the exit gate (`model.early_exit_gate`) stay in {dtype}.\n\n\
Stock mlx-lm has no Ouro architecture; this directory carries its own model file, `ouro.py`, which mlx-lm loads with\n\
`trust_remote_code`. It runs all {t} loops with a per-(loop, layer) KV cache and returns the logits the upstream model\n\
returns (exit CDF rule with `early_exit_threshold`, or `exit_at_step`).\n\n\
## Use with mlx\n\n\
```bash\npip install mlx-lm\nmlx_lm.generate --model {name} --trust-remote-code --prompt \"hello\"\n```\n\n\
```python\nfrom mlx_lm import load, generate\n\nmodel, tokenizer = load(\"{name}\", trust_remote_code=True)\n\
messages = [{{\"role\": \"user\", \"content\": \"hello\"}}]\n\
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)\n\
response = generate(model, tokenizer, prompt=prompt, verbose=True)\n```\n\n\
## Validation\n\n{validation}\n",
        ver = env!("CARGO_PKG_VERSION"),
        dtype = ck.dtype().name(),
        t = ck.config.total_ut_steps,
    )
}

/// Converts `ck` into an MLX directory at `out`. `progress(done_bytes, total_bytes, tensor)`.
pub fn convert_mlx(
    ck: &Checkpoint,
    opts: &MlxOptions,
    out: &Path,
    progress: &(dyn Fn(u64, u64, &str) + Sync),
) -> Result<MlxSummary> {
    let start = Instant::now();
    if ck.tokenizer.tokenizer_json.is_none() {
        return Err(Error::file(&ck.dir, "no tokenizer.json: an MLX model directory must carry the tokenizer"));
    }
    let plan = plan_mlx(ck, opts)?;
    let pending = PendingOutput::dir(out, opts.force)?;
    let dir = pending.path().to_path_buf();
    let specs: Vec<TensorSpec> = plan.iter().flat_map(|p| p.outputs()).collect();
    let shards = make_shards(&specs, opts.shard_bytes);
    let n = shards.len();
    let total_in: u64 = plan.iter().map(|p| ck.tensor(&p.hf_name).map(|t| t.bytes.len() as u64).unwrap_or(0)).sum();
    let meta: BTreeMap<String, String> = [("format".to_string(), "mlx".to_string())].into();

    // Tensors in output order; shards are consecutive runs of them. A writer thread appends the
    // bytes and checksums them while the rayon pool quantizes the next tensor.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Bytes<'_>)>(3);
    let weights = &ck.weights;
    let (sums, shard_sums) = std::thread::scope(|scope| -> Result<(BTreeMap<String, Checksum>, Vec<Checksum>)> {
        let writer = scope.spawn(|| write_shards(&dir, &shards, &meta, rx, weights));
        let produced = (|| -> Result<()> {
            let mut done = 0u64;
            for p in &plan {
                let t = ck.tensor(&p.hf_name)?;
                match p.quant {
                    None => {
                        if let Some((i, v)) = first_non_finite(t.dtype(), t.bytes) {
                            return Err(Error::tensor(t.file, &p.hf_name, format!("non-finite value {v} at element {i}")));
                        }
                        if tx.send((p.hf_name.clone(), Bytes::Borrowed(t.bytes))).is_err() {
                            return Ok(()); // the writer failed; its error is reported below
                        }
                    }
                    Some((bits, gs)) => {
                        let parts = quantize_tensor(ck, p, bits, gs, opts.imatrix.as_ref())?;
                        ck.weights.release(&p.hf_name);
                        for (spec, bytes) in p.outputs().into_iter().zip(parts) {
                            if tx.send((spec.name, Bytes::Owned(bytes))).is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                done += t.bytes.len() as u64;
                progress(done, total_in, &p.hf_name);
            }
            Ok(())
        })();
        drop(tx);
        let written = writer.join().expect("writer thread panicked");
        produced?;
        written
    })?;
    // The index, config, model file, tokenizer files and card.
    let total_size: u64 = specs.iter().map(|s| s.nbytes() as u64).sum();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        for s in shard {
            weight_map.insert(s.name.clone(), shard_name(i, n));
        }
    }
    let params = ck.config.parameter_count();
    // Every file but the index and the card, with its checksum, recorded in the index.
    let mut files: Vec<(String, Checksum)> = shard_sums.iter().enumerate().map(|(i, c)| (shard_name(i, n), *c)).collect();
    files.push(("config.json".into(), write_file(&dir.join("config.json"), &output_config(ck, &plan, opts)?)?));
    files.push(("ouro.py".into(), write_file(&dir.join("ouro.py"), super::OURO_PY.as_bytes())?));
    for f in &ck.tokenizer.extra_files {
        let name = f.file_name().expect("file name").to_string_lossy().into_owned();
        let bytes = std::fs::read(f).at(f)?;
        files.push((name.clone(), write_file(&dir.join(&name), &bytes)?));
    }
    let record = crate::verify::MlxRecord {
        algorithm: crate::verify::ALGORITHM.into(),
        files: files.iter().map(|(n, c)| (n.clone(), crate::verify::hex(*c))).collect(),
        tensors: sums.iter().map(|(n, c)| (n.clone(), crate::verify::hex(*c))).collect(),
    };
    let mut metadata = json!({"total_size": total_size, "total_parameters": params, crate::verify::MLX_INDEX_KEY: record});
    if let Some(im) = &opts.imatrix {
        // what llama-quantize records in a GGUF file, under the same names
        let m = metadata.as_object_mut().expect("an object");
        m.insert("quantize.imatrix.file".into(), json!(im.path.display().to_string()));
        if let Some(d) = im.matrix.datasets.first() {
            m.insert("quantize.imatrix.dataset".into(), json!(d));
        }
        m.insert("quantize.imatrix.entries_count".into(), json!(im.matrix.entries.len()));
        m.insert("quantize.imatrix.chunks_count".into(), json!(im.matrix.chunk_count));
        if let Some(w) = &im.matrix.weighting {
            m.insert("quantize.imatrix.weighting".into(), json!(w));
        }
        m.insert("quantize.imatrix.tensors".into(), json!(plan.iter().filter(|p| p.imatrix).count()));
    }
    let index = json!({"metadata": metadata, "weight_map": weight_map});
    write_file(&dir.join("model.safetensors.index.json"), &pretty4(&index)?)?;
    let name = pending
        .target()
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| default_output_name(ck, opts));
    write_file(&dir.join("README.md"), model_card(ck, opts, &plan, &name, None).as_bytes())?;

    verify(&dir, &shards, &meta, &sums, &files)?;
    let bytes: u64 = shards
        .iter()
        .enumerate()
        .map(|(i, _)| std::fs::metadata(dir.join(shard_name(i, n))).map(|m| m.len()).unwrap_or(0))
        .sum();
    let output = pending.commit()?;
    let secs = start.elapsed().as_secs_f64();
    Ok(MlxSummary {
        output,
        bits: opts.bits,
        group_size: opts.group_size,
        recipe: opts.recipe.map(|r| r.name().to_string()),
        bytes,
        parameters: params,
        bits_per_weight: total_size as f64 * 8.0 / params as f64,
        input_bytes: total_in,
        seconds: secs,
        input_gb_per_s: total_in as f64 / secs / 1e9,
        shards: n,
        quantized_tensors: plan.iter().filter(|p| p.quant.is_some()).count(),
        float_tensors: plan.iter().filter(|p| p.quant.is_none()).count(),
    })
}

/// The first NaN or infinity of a float tensor, scanned in parallel chunks.
fn first_non_finite(dtype: DType, bytes: &[u8]) -> Option<(usize, f32)> {
    const CHUNK: usize = 1 << 16;
    let es = dtype.size();
    bytes
        .par_chunks(CHUNK * es)
        .enumerate()
        .filter_map(|(ci, b)| {
            let mut v = vec![0f32; b.len() / es];
            decode_f32(dtype, b, &mut v);
            crate::checkpoint::first_non_finite(&v).map(|(i, x)| (ci * CHUNK + i, x))
        })
        .min_by_key(|(i, _)| *i)
}

/// Tensor bytes on their way to the writer thread: straight from the input map, or made here.
enum Bytes<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Borrowed(b) => b,
            Bytes::Owned(v) => v,
        }
    }
}

/// Receives the tensors in output order and writes them into the planned shards, returning each
/// tensor's checksum. Stops at the first error (the sender then sees a closed channel).
fn write_shards(
    dir: &Path,
    shards: &[Vec<TensorSpec>],
    meta: &BTreeMap<String, String>,
    rx: std::sync::mpsc::Receiver<(String, Bytes<'_>)>,
    weights: &crate::checkpoint::Weights,
) -> Result<(BTreeMap<String, Checksum>, Vec<Checksum>)> {
    let n = shards.len();
    let mut sums = BTreeMap::new();
    let mut file_sums = Vec::with_capacity(n);
    let mut shard = 0usize;
    let mut writer = Writer::new(dir.join(shard_name(0, n)), shards[0].clone(), meta)?;
    for (name, bytes) in rx {
        if writer.current().map(|s| s.name.as_str()) != Some(name.as_str()) {
            // The current shard is complete: open the next one.
            shard += 1;
            if shard >= n {
                return Err(Error::tensor(dir, &name, "internal: more tensors than planned"));
            }
            let next = Writer::new(dir.join(shard_name(shard, n)), shards[shard].clone(), meta)?;
            file_sums.push(std::mem::replace(&mut writer, next).finish()?);
        }
        writer.write(&bytes)?;
        sums.insert(name.clone(), checksum(&bytes));
        if let Bytes::Borrowed(_) = bytes {
            // copied from the input map: its pages are no longer needed
            weights.release(&name);
        }
    }
    file_sums.push(writer.finish()?);
    Ok((sums, file_sums))
}

/// Writes and syncs a small file; returns the checksum of its bytes.
fn write_file(path: &Path, bytes: &[u8]) -> Result<Checksum> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).at(path)?;
    f.write_all(bytes).at(path)?;
    f.sync_all().at(path)?;
    Ok(checksum(bytes))
}

/// Re-opens every shard with the strict reader and checks it against what was written: the header
/// byte for byte, every tensor's checksum (in parallel), and the length (so together every byte of
/// the file, whose recorded checksum was taken while writing); then the other recorded files.
fn verify(
    dir: &Path,
    shards: &[Vec<TensorSpec>],
    meta: &BTreeMap<String, String>,
    sums: &BTreeMap<String, Checksum>,
    files: &[(String, Checksum)],
) -> Result<()> {
    let fail = |path: &Path, what: &str| Error::file(path, format!("verification failed: {what} read back differs from what was written"));
    for (i, shard) in shards.iter().enumerate() {
        let path = dir.join(shard_name(i, shards.len()));
        let head = crate::stfile::header_bytes(shard, meta);
        let f = SafetensorsFile::open(&path)?;
        let len = std::fs::metadata(&path).at(&path)?.len() as usize;
        let data: usize = shard.iter().map(|s| s.nbytes()).sum();
        if len != head.len() + data || f.header().data_start() != head.len() {
            return Err(fail(&path, "the length"));
        }
        {
            use std::io::Read;
            let mut got = vec![0u8; head.len()];
            std::fs::File::open(&path).at(&path)?.read_exact(&mut got).at(&path)?;
            if got != head {
                return Err(fail(&path, "the header"));
            }
        }
        let bad = shard.par_iter().find_any(|s| {
            let ok = f.bytes(&s.name).is_some_and(|b| Some(&checksum(b)) == sums.get(&s.name));
            f.release(&s.name);
            !ok
        });
        if let Some(s) = bad {
            return Err(Error::tensor(&path, &s.name, "verification failed: the bytes read back differ from those written"));
        }
    }
    for (name, sum) in files.iter().skip(shards.len()) {
        let path = dir.join(name);
        if crate::verify::file_checksum(&path)? != *sum {
            return Err(fail(&path, "the file"));
        }
    }
    Ok(())
}
