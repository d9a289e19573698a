//! Where the model's weights come from. Each source hands the model dense or quantized matrices
//! by HF tensor name; the model code does not know which.

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};

use super::linear::{float_linear, FloatKind, FloatMatrix, Linear};
use super::placement::{held, Held, Stored, Target};
use candle_core::{Device, Tensor};

use crate::checkpoint::{Checkpoint, OuroConfig};
use crate::gguf::arch::RowOrder;
use crate::gguf::file::{GgufFile, TensorInfo, Value};
use crate::quant::ggml::GgmlType;

/// A provider of Ouro weights by HF name.
pub trait WeightSource {
    fn config(&self) -> &OuroConfig;
    /// A projection `[out, in]` ready for `x @ W^T`, and the bytes it occupies.
    fn linear(&self, hf_name: &str, device: &Device) -> anyhow::Result<(Linear, u64)>;
    /// A vector (norm gain, gate weight or bias) as f32.
    fn vector(&self, hf_name: &str, device: &Device) -> anyhow::Result<Tensor>;
    /// The token embedding `[vocab, hidden]`.
    fn embedding(&self, device: &Device) -> anyhow::Result<super::Embedding>;
}

/// Weights of an HF checkpoint, widened to f32 (exact for BF16 and F16).
pub struct HfSource {
    pub checkpoint: Checkpoint,
}

impl HfSource {
    fn f32_tensor(&self, name: &str, device: &Device) -> anyhow::Result<Tensor> {
        let t = self.checkpoint.tensor(name)?;
        Ok(Tensor::from_vec(t.to_f32(), t.shape(), device)?)
    }
}

impl WeightSource for HfSource {
    fn config(&self) -> &OuroConfig {
        &self.checkpoint.config
    }
    fn linear(&self, hf_name: &str, device: &Device) -> anyhow::Result<(Linear, u64)> {
        let t = self.checkpoint.tensor(hf_name)?;
        let (rows, cols) = match t.shape() {
            [r, c] => (*r, *c),
            s => anyhow::bail!("{}: tensor {hf_name} has shape {s:?}, expected a matrix", t.file.display()),
        };
        let Some(kind) = FloatKind::of_stored(t.dtype()) else {
            anyhow::bail!("{}: tensor {hf_name} is {}, not a float", t.file.display(), t.dtype())
        };
        let out = float_linear(kind, t.bytes, rows, cols, device)?;
        self.checkpoint.weights.release(hf_name);
        Ok(out)
    }
    fn vector(&self, hf_name: &str, device: &Device) -> anyhow::Result<Tensor> {
        Ok(self.f32_tensor(hf_name, device)?.flatten_all()?)
    }
    fn embedding(&self, device: &Device) -> anyhow::Result<super::Embedding> {
        let name = "model.embed_tokens.weight";
        let t = self.checkpoint.tensor(name)?;
        let kind = match t.dtype() {
            crate::stfile::DType::BF16 => FloatKind::Bf16,
            crate::stfile::DType::F16 => FloatKind::F16,
            _ => FloatKind::F32,
        };
        if device.is_cpu() && kind != FloatKind::F32 {
            if let [rows, cols] = *t.shape() {
                return Ok(super::Embedding::Float(FloatMatrix::from_le_bytes(kind, t.bytes, rows, cols)));
            }
        }
        Ok(super::Embedding::Dense(self.f32_tensor(name, device)?))
    }
}

/// A model ready to run with what generation needs besides the weights.
pub struct LoadedModel {
    pub model: super::OuroModel,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub chat_template: Option<String>,
    /// What was loaded, for messages.
    pub description: String,
}

impl LoadedModel {
    fn new(
        src: &dyn WeightSource,
        device: &Device,
        tokenizer: Option<tokenizers::Tokenizer>,
        chat_template: Option<String>,
        description: String,
    ) -> anyhow::Result<Self> {
        Ok(LoadedModel {
            model: super::OuroModel::load(src, device)?,
            tokenizer,
            chat_template,
            description,
        })
    }
}

/// Weights of one of our GGUF files: quantized matrices stay quantized (candle's quantized matmul);
/// Q/K rows are put back in HF order, because the model applies rope in the HF layout.
pub struct GgufSource {
    pub file: GgufFile,
    pub config: OuroConfig,
}

fn candle_dtype(t: GgmlType) -> anyhow::Result<GgmlDType> {
    Ok(match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q2_K => GgmlDType::Q2K,
        GgmlType::Q3_K => GgmlDType::Q3K,
        GgmlType::Q4_K => GgmlDType::Q4K,
        GgmlType::Q5_K => GgmlDType::Q5K,
        GgmlType::Q6_K => GgmlDType::Q6K,
        _ => anyhow::bail!("{t} has no candle kernel"),
    })
}

impl GgufSource {
    /// Opens a GGUF file written in the `ouro` layout and rebuilds the config from its metadata.
    pub fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let file = GgufFile::open(path)?;
        let h = &file.header;
        let arch = h.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("");
        if arch != crate::gguf::arch::ARCH {
            anyhow::bail!("{}: general.architecture is `{arch}`, not `ouro`", path.display());
        }
        let u = |k: &str| -> anyhow::Result<u32> {
            h.get(&format!("ouro.{k}"))
                .and_then(|v| v.as_u32())
                .ok_or_else(|| anyhow::anyhow!("{}: key ouro.{k} missing or not UINT32", path.display()))
        };
        let f = |k: &str| -> anyhow::Result<f32> {
            h.get(&format!("ouro.{k}"))
                .and_then(|v| v.as_f32())
                .ok_or_else(|| anyhow::anyhow!("{}: key ouro.{k} missing or not FLOAT32", path.display()))
        };
        let emb = h
            .tensor("token_embd.weight")
            .ok_or_else(|| anyhow::anyhow!("{}: no token_embd.weight", path.display()))?;
        let mut cfg = serde_json::json!({
            "model_type": "ouro",
            "vocab_size": emb.shape[0],
            "hidden_size": u("embedding_length")?,
            "intermediate_size": u("feed_forward_length")?,
            "num_hidden_layers": u("block_count")?,
            "num_attention_heads": u("attention.head_count")?,
            "num_key_value_heads": u("attention.head_count_kv")?,
            "head_dim": u("attention.key_length")?,
            "max_position_embeddings": u("context_length")?,
            // f32 in the file; widened back to the decimal the config held
            "rms_norm_eps": f("attention.layer_norm_rms_epsilon")? as f64,
            "rope_theta": f("rope.freq_base")? as f64,
            "total_ut_steps": u("num_loops")?,
            "tie_word_embeddings": h.tensor("output.weight").is_none(),
            "eos_token_id": [crate::checkpoint::config::IM_END_ID, crate::checkpoint::config::ENDOFTEXT_ID],
            "hidden_act": "silu",
        });
        if let Some(q) = h.get(crate::gguf::arch::KEY_EXIT_THRESHOLD).and_then(|v| v.as_f32()) {
            cfg["early_exit_threshold"] = serde_json::json!(q as f64);
        }
        let config = OuroConfig::from_map(cfg.as_object().expect("object").clone(), path)?;
        Ok(GgufSource { file, config })
    }

    fn info(&self, hf_name: &str) -> anyhow::Result<(&TensorInfo, RowOrder)> {
        let m = crate::gguf::arch::tensor_map(&self.config)
            .into_iter()
            .find(|m| m.hf_name == hf_name)
            .ok_or_else(|| anyhow::anyhow!("no GGUF tensor for {hf_name}"))?;
        let info = self
            .file
            .header
            .tensor(&m.gguf_name)
            .ok_or_else(|| anyhow::anyhow!("{}: tensor {} missing", self.file.path.display(), m.gguf_name))?;
        Ok((info, m.row_order))
    }

    /// The tensor's bytes with rows in HF order.
    fn hf_rows(&self, info: &TensorInfo, order: RowOrder) -> Vec<u8> {
        let bytes = self.file.tensor_bytes(info);
        if order == RowOrder::AsIs {
            return bytes.to_vec();
        }
        let cols = *info.shape.last().expect("2-D");
        let rows = info.numel() / cols;
        let rb = info.ggml_type.row_bytes(cols);
        let mut out = vec![0u8; bytes.len()];
        for s in 0..rows {
            let t = order.target_row(s, rows);
            out[s * rb..(s + 1) * rb].copy_from_slice(&bytes[t * rb..(t + 1) * rb]);
        }
        out
    }

    /// A projection as the model multiplies it, and the bytes it holds.
    fn matrix(&self, info: &TensorInfo, order: RowOrder, device: &Device) -> anyhow::Result<(Linear, u64)> {
        if matches!(info.ggml_type, GgmlType::IQ4_NL | GgmlType::IQ4_XS) {
            // candle has no IQ4_NL or IQ4_XS type: our kernel multiplies the blocks where the CPU
            // has one, else a copy widened by our dequantizer is multiplied densely.
            let xs = info.ggml_type == GgmlType::IQ4_XS;
            let raw = self.hf_rows(info, order);
            let cols = *info.shape.last().expect("2-D");
            let bytes = raw.len() as u64;
            let how = held(Stored::Ggml(info.ggml_type), cols, Target::of(device));
            if how == Held::Q8_0 {
                // the same values as Q8_0 blocks, which candle multiplies on GPUs
                let q8 = crate::quant::iq4nl::iq4_nl_as_q8_0(&raw);
                let bytes = q8.len() as u64;
                let q = qtensor_from_ggml(GgmlDType::Q8_0, &q8, info.shape.clone(), device)?;
                return Ok((Linear::Candle(QMatMul::from_arc(std::sync::Arc::new(q))?), bytes));
            }
            let raw = if how == Held::AsStored {
                let rows = info.numel() / cols;
                let m = if xs { super::qkernel::QuantMatrix::iq4_xs(raw, rows, cols) } else { super::qkernel::QuantMatrix::iq4_nl(raw, rows, cols) };
                match m {
                    Ok(m) => return Ok((Linear::Quant(m), bytes)),
                    Err(raw) => raw,
                }
            } else {
                raw
            };
            let mut v = Vec::with_capacity(info.numel());
            if xs {
                crate::quant::iq4nl::dequantize_iq4_xs(&raw, &mut v);
            } else {
                crate::quant::iq4nl::dequantize_iq4_nl(&raw, &mut v);
            }
            let bytes = (v.len() * 4) as u64;
            return Ok((Linear::Candle(QMatMul::Tensor(Tensor::from_vec(v, info.shape.clone(), device)?)), bytes));
        }
        if let Some(dequantize) = crate::quant::dequantizer(info.ggml_type) {
            // the lattice i-quants: no kernel here or in candle multiplies their blocks; on the
            // CPU they stay blocks, dequantized per product; elsewhere a widened copy
            let raw = self.hf_rows(info, order);
            let cols = *info.shape.last().expect("2-D");
            let rows = info.numel() / cols;
            let as_stored = held(Stored::Ggml(info.ggml_type), cols, Target::of(device)) == Held::AsStored;
            if let (true, Some(decode)) = (as_stored, crate::quant::block_decoder(info.ggml_type)) {
                let m = super::linear::BlockMatrix::new(raw, rows, cols, info.ggml_type.block_bytes(), decode);
                let bytes = m.bytes();
                return Ok((Linear::Blocks(m), bytes));
            }
            let mut v = Vec::with_capacity(info.numel());
            dequantize(&raw, &mut v);
            let bytes = (v.len() * 4) as u64;
            return Ok((Linear::Candle(QMatMul::Tensor(Tensor::from_vec(v, info.shape.clone(), device)?)), bytes));
        }
        let float = match info.ggml_type {
            GgmlType::F32 => Some(FloatKind::F32),
            GgmlType::F16 => Some(FloatKind::F16),
            GgmlType::BF16 => Some(FloatKind::Bf16),
            _ => None,
        };
        if let Some(kind) = float {
            let cols = *info.shape.last().expect("2-D");
            let raw = self.hf_rows(info, order);
            return Ok(float_linear(kind, &raw, info.numel() / cols, cols, device)?);
        }
        let (q, bytes) = self.qtensor(info, order, device)?;
        // candle's Q4_1/Q5_0/Q5_1 dot products assume an even number of blocks per row (and
        // panic otherwise): multiply such rows densely.
        if held(Stored::Ggml(info.ggml_type), info.shape[1], Target::of(device)) == Held::DenseF32 {
            let dense = q.dequantize(device)?;
            let b = (dense.elem_count() * 4) as u64;
            return Ok((Linear::Candle(QMatMul::Tensor(dense)), b));
        }
        let q = std::sync::Arc::new(q);
        if let Some(m) = super::qkernel::QuantMatrix::new(q.clone()) {
            return Ok((Linear::Quant(m), bytes));
        }
        Ok((Linear::Candle(QMatMul::from_arc(q)?), bytes))
    }

    fn qtensor(&self, info: &TensorInfo, order: RowOrder, device: &Device) -> anyhow::Result<(QTensor, u64)> {
        let raw = self.hf_rows(info, order);
        let q = qtensor_from_ggml(candle_dtype(info.ggml_type)?, &raw, info.shape.clone(), device)?;
        Ok((q, raw.len() as u64))
    }
}

impl WeightSource for GgufSource {
    fn config(&self) -> &OuroConfig {
        &self.config
    }
    fn linear(&self, hf_name: &str, device: &Device) -> anyhow::Result<(Linear, u64)> {
        let (info, order) = self.info(hf_name)?;
        let out = self.matrix(info, order, device)?;
        // the model holds its own copy now: the file's pages need not stay resident beside it
        self.file.release(info);
        Ok(out)
    }
    fn vector(&self, hf_name: &str, device: &Device) -> anyhow::Result<Tensor> {
        let h = &self.file.header;
        match hf_name {
            "model.early_exit_gate.weight" | "model.early_exit_gate.bias" => {
                let key = if hf_name.ends_with("weight") {
                    crate::gguf::arch::KEY_GATE_WEIGHT
                } else {
                    crate::gguf::arch::KEY_GATE_BIAS
                };
                let v: Vec<f32> = match h.get(key) {
                    Some(Value::Array(_, a)) => a.iter().filter_map(|x| x.as_f32()).collect(),
                    Some(Value::F32(x)) => vec![*x],
                    _ => anyhow::bail!("{}: exit gate key {key} missing: not written by ouro-quant?", self.file.path.display()),
                };
                Ok(Tensor::from_vec(v.clone(), v.len(), device)?)
            }
            _ => {
                let (info, order) = self.info(hf_name)?;
                let v = self.qtensor(info, order, device)?.0.dequantize(device)?.flatten_all()?;
                self.file.release(info);
                Ok(v)
            }
        }
    }
    fn embedding(&self, _device: &Device) -> anyhow::Result<super::Embedding> {
        let (info, _) = self.info("model.embed_tokens.weight")?;
        let format = match crate::quant::dequantizer(info.ggml_type) {
            Some(d) => super::RowFormat::Ours(d),
            None => super::RowFormat::Candle(candle_dtype(info.ggml_type)?),
        };
        let cols = info.shape[1];
        let bytes = self.file.tensor_bytes(info).to_vec();
        self.file.release(info);
        Ok(super::Embedding::Quantized {
            format,
            bytes,
            row_bytes: info.ggml_type.row_bytes(cols),
            hidden: cols,
        })
    }
}

/// Weights of an MLX directory. On the CPU, affine-quantized matrices keep their packed codes and
/// stored-width scales and biases ([`super::affine`]), float ones their stored width, so the model
/// takes the directory's size in memory; elsewhere each is widened to f32 as it is loaded (MLX's
/// formula, `scale * q + bias`).
pub struct MlxSource {
    pub dir: crate::mlx::read::MlxDir,
}

impl MlxSource {
    fn dense(&self, hf_name: &str, device: &Device) -> anyhow::Result<(Tensor, u64)> {
        let (v, shape, _) = self.dir.tensor_f32(hf_name)?;
        let bytes = v.len() as u64 * 4;
        Ok((Tensor::from_vec(v, shape, device)?, bytes))
    }

    /// The matrix at its stored width (CPU only; `None` on other devices).
    fn stored_width(&self, hf_name: &str, device: &Device) -> anyhow::Result<Option<StoredMatrix>> {
        use crate::mlx::read::Stored;
        if !device.is_cpu() {
            return Ok(None);
        }
        let m = match self.dir.stored(hf_name)? {
            Stored::Float { dtype, bytes, shape } => match (FloatKind::of_stored(dtype), shape.as_slice()) {
                (Some(kind), &[rows, cols]) => StoredMatrix::Float(FloatMatrix::from_le_bytes(kind, bytes, rows, cols)),
                _ => return Ok(None),
            },
            Stored::Quantized { shape, bits, group, words, scales, biases } => {
                match (FloatKind::of_stored(scales.0), scales.0 == biases.0) {
                    (Some(kind), true) => StoredMatrix::Affine(
                        super::affine::AffineMatrix::from_le_bytes((shape[0], shape[1]), bits, group, words, (kind, scales.1, biases.1))
                            .map_err(|e| anyhow::anyhow!("{}: {hf_name}: {e}", self.dir.dir.display()))?,
                    ),
                    _ => return Ok(None),
                }
            }
        };
        self.dir.release(hf_name);
        Ok(Some(m))
    }
}

enum StoredMatrix {
    Float(FloatMatrix),
    Affine(super::affine::AffineMatrix),
}

impl WeightSource for MlxSource {
    fn config(&self) -> &OuroConfig {
        &self.dir.config
    }
    fn linear(&self, hf_name: &str, device: &Device) -> anyhow::Result<(Linear, u64)> {
        match self.stored_width(hf_name, device)? {
            Some(StoredMatrix::Float(m)) => {
                let b = m.bytes();
                Ok((Linear::Float(m), b))
            }
            Some(StoredMatrix::Affine(m)) => {
                let b = m.bytes();
                Ok((Linear::Affine(m), b))
            }
            None => {
                let (t, bytes) = self.dense(hf_name, device)?;
                self.dir.release(hf_name);
                Ok((Linear::Candle(QMatMul::Tensor(t)), bytes))
            }
        }
    }
    fn vector(&self, hf_name: &str, device: &Device) -> anyhow::Result<Tensor> {
        Ok(self.dense(hf_name, device)?.0.flatten_all()?)
    }
    fn embedding(&self, device: &Device) -> anyhow::Result<super::Embedding> {
        let name = "model.embed_tokens.weight";
        Ok(match self.stored_width(name, device)? {
            Some(StoredMatrix::Float(m)) => super::Embedding::Float(m),
            Some(StoredMatrix::Affine(m)) => super::Embedding::Affine(m),
            None => super::Embedding::Dense(self.dense(name, device)?.0),
        })
    }
}

/// Loads a model from an HF checkpoint directory, one of our GGUF files or an MLX directory.
pub fn load(path: &std::path::Path, device: &Device) -> anyhow::Result<LoadedModel> {
    if path.is_file() {
        let src = GgufSource::open(path)?;
        let h = &src.file.header;
        let tokenizer = Some(crate::gguf::tokenizer::tokenizer_from_metadata(&|k| h.get(k).cloned())?);
        let chat_template = h.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string);
        let ft = h.get("general.file_type").and_then(|v| v.as_u32()).unwrap_or(0);
        let description = format!("GGUF {} (file type {ft})", path.display());
        return LoadedModel::new(&src, device, tokenizer, chat_template, description);
    }
    if path.is_dir() && crate::mlx::read::is_mlx_dir(path) {
        let dir = crate::mlx::read::MlxDir::open(path)?;
        let tj = path.join("tokenizer.json");
        let tokenizer = if tj.is_file() {
            Some(tokenizers::Tokenizer::from_file(&tj).map_err(|e| anyhow::anyhow!("{}: {e}", tj.display()))?)
        } else {
            None
        };
        let chat_template = crate::checkpoint::read_tokenizer_files(path, &mut vec![])?.chat_template();
        let q = dir.config.raw.get("quantization").cloned();
        let description = match q {
            Some(q) => format!("MLX {} ({}-bit, group size {})", path.display(), q["bits"], q["group_size"]),
            None => format!("MLX {} (unquantized)", path.display()),
        };
        let src = MlxSource { dir };
        return LoadedModel::new(&src, device, tokenizer, chat_template, description);
    }
    if path.is_dir() && path.join("config.json").is_file() {
        let checkpoint = Checkpoint::open(path)?;
        let tokenizer = match &checkpoint.tokenizer.tokenizer_json {
            Some(_) => Some(checkpoint.tokenizer.load()?),
            None => None,
        };
        let chat_template = checkpoint.tokenizer.chat_template();
        let description = format!("HF checkpoint {} ({})", path.display(), checkpoint.dtype());
        let src = HfSource { checkpoint };
        return LoadedModel::new(&src, device, tokenizer, chat_template, description);
    }
    anyhow::bail!(
        "{}: neither a GGUF file nor an HF Ouro checkpoint directory (config.json missing)",
        path.display()
    )
}

/// The tokenizer of a model without loading its weights: `tokenizer.json` of a directory, or the
/// one rebuilt from a GGUF file's metadata.
pub fn load_tokenizer(path: &std::path::Path) -> anyhow::Result<tokenizers::Tokenizer> {
    if path.is_file() {
        let g = GgufFile::open(path)?;
        return crate::gguf::tokenizer::tokenizer_from_metadata(&|k| g.header.get(k).cloned());
    }
    let tj = path.join("tokenizer.json");
    anyhow::ensure!(tj.is_file(), "{}: no tokenizer.json", path.display());
    tokenizers::Tokenizer::from_file(&tj).map_err(|e| anyhow::anyhow!("{}: not a valid tokenizer: {e}", tj.display()))
}

/// How a model's weights are stored, as far as its format says: what `validate` maps to a profile
/// (the model layer knows formats, not validation policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quantization {
    /// An HF checkpoint (float weights).
    Float,
    /// A GGUF file of this file type (its name, `?` for an id we do not know).
    Gguf(&'static str),
    /// An MLX directory with these top-level bits (`None`: unquantized).
    Mlx(Option<u32>),
}

/// The [`Quantization`] of the model at `path`: a GGUF file's type, an MLX directory's bits, or
/// an HF checkpoint.
pub fn quantization(path: &std::path::Path) -> anyhow::Result<Quantization> {
    if path.is_file() {
        let g = GgufFile::open(path)?;
        let id = g.header.get("general.file_type").and_then(|v| v.as_u32()).unwrap_or(0);
        let name = crate::gguf::mix::FileType::ALL.iter().find(|t| t.id() == id).map(|t| t.name()).unwrap_or("?");
        return Ok(Quantization::Gguf(name));
    }
    if crate::mlx::read::is_mlx_dir(path) {
        let text = std::fs::read_to_string(path.join("config.json"))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let bits = v.get("quantization").and_then(|q| q.get("bits")).and_then(|b| b.as_u64()).map(|b| b as u32);
        return Ok(Quantization::Mlx(bits));
    }
    Ok(Quantization::Float)
}

/// What loading a model onto a target will hold, counted from its headers before any weight is
/// read ([`super::placement`]'s rule, the one the loader follows).
#[derive(Debug, Clone)]
pub struct Footprint {
    pub config: OuroConfig,
    pub weights: super::placement::Bytes,
}

/// The [`Footprint`] of the model at `path` (GGUF file, MLX directory or HF checkpoint) on `target`.
pub fn footprint(path: &std::path::Path, target: super::placement::Target) -> anyhow::Result<Footprint> {
    use super::placement as pl;
    let float = |d: crate::stfile::DType| Stored::Float { width: FloatKind::of_stored(d).map_or(4, |k| k.size()) };
    let gguf;
    let mlx;
    let ck;
    let (config, stored): (OuroConfig, Box<dyn Fn(&str) -> anyhow::Result<(Stored, usize, usize)> + '_>);
    if path.is_file() {
        gguf = GgufSource::open(path)?;
        config = gguf.config.clone();
        let g = &gguf;
        stored = Box::new(move |name| {
            let (info, _) = g.info(name)?;
            let cols = *info
                .shape
                .last()
                .ok_or_else(|| anyhow::anyhow!("{}: tensor for {name} has no dimensions", path.display()))?;
            Ok((Stored::Ggml(info.ggml_type), info.numel() / cols.max(1), cols))
        });
    } else if crate::mlx::read::is_mlx_dir(path) {
        mlx = crate::mlx::read::MlxDir::open(path)?;
        config = mlx.config.clone();
        let m = &mlx;
        stored = Box::new(move |name| {
            use crate::mlx::read::Stored as S;
            Ok(match m.stored(name)? {
                S::Float { dtype, shape, .. } => (float(dtype), shape.first().copied().unwrap_or(1), shape.iter().skip(1).product()),
                S::Quantized { shape, bits, group, scales, biases, .. } => {
                    let width = FloatKind::of_stored(scales.0).filter(|_| scales.0 == biases.0).map(|k| k.size());
                    (Stored::Affine { bits, group, scale_width: width }, shape[0], shape[1])
                }
            })
        });
    } else {
        ck = Checkpoint::open(path)?;
        config = ck.config.clone();
        let c = &ck;
        stored = Box::new(move |name| {
            let t = c.tensor(name)?;
            let cols = *t.shape().last().unwrap_or(&1);
            Ok((float(t.dtype()), t.shape().iter().product::<usize>() / cols.max(1), cols))
        });
    }
    let weights = pl::model_bytes(&config, target, &*stored)?;
    Ok(Footprint { config, weights })
}
