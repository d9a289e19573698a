//! An HF Ouro checkpoint directory: `config.json`, weights in `model.safetensors` or shards named by
//! `model.safetensors.index.json` (memory-mapped, zero-copy), and the tokenizer files.
//!
//! Opening a checkpoint checks everything that can be checked without reading tensor values: the
//! config, every expected tensor's presence, dtype and shape, and the tokenizer files' syntax.

pub mod config;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

pub use config::{Correction, OuroConfig};

use crate::error::{Error, IoContext, Result};
use crate::stfile::{DType, SafetensorsFile, TensorInfo};

/// A tensor the config implies, with its HF name and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

/// What a tensor is, for choosing how to quantize it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TensorRole {
    Embedding,
    /// A projection of layer `layer`.
    Linear { layer: usize },
    Norm,
    ExitGate,
    LmHead,
}

/// Every tensor of an Ouro checkpoint with this config, in the order of the HF module tree.
pub fn expected_tensors(c: &OuroConfig) -> Vec<ExpectedTensor> {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let t = |name: String, shape: &[usize]| ExpectedTensor {
        name,
        shape: shape.to_vec(),
    };
    let mut out = vec![t("model.embed_tokens.weight".into(), &[v, h])];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push(t(format!("{p}.self_attn.q_proj.weight"), &[q, h]));
        out.push(t(format!("{p}.self_attn.k_proj.weight"), &[kv, h]));
        out.push(t(format!("{p}.self_attn.v_proj.weight"), &[kv, h]));
        out.push(t(format!("{p}.self_attn.o_proj.weight"), &[h, q]));
        out.push(t(format!("{p}.mlp.gate_proj.weight"), &[i, h]));
        out.push(t(format!("{p}.mlp.up_proj.weight"), &[i, h]));
        out.push(t(format!("{p}.mlp.down_proj.weight"), &[h, i]));
        for n in [
            "input_layernorm",
            "input_layernorm_2",
            "post_attention_layernorm",
            "post_attention_layernorm_2",
        ] {
            out.push(t(format!("{p}.{n}.weight"), &[h]));
        }
    }
    out.push(t("model.norm.weight".into(), &[h]));
    out.push(t("model.early_exit_gate.weight".into(), &[1, h]));
    out.push(t("model.early_exit_gate.bias".into(), &[1]));
    if !c.tie_word_embeddings {
        out.push(t("lm_head.weight".into(), &[v, h]));
    }
    out
}

/// The role of an HF tensor name.
pub fn tensor_role(name: &str) -> Option<TensorRole> {
    if name == "model.embed_tokens.weight" {
        return Some(TensorRole::Embedding);
    }
    if name == "lm_head.weight" {
        return Some(TensorRole::LmHead);
    }
    if name.starts_with("model.early_exit_gate.") {
        return Some(TensorRole::ExitGate);
    }
    if name == "model.norm.weight" || name.ends_with("layernorm.weight") || name.ends_with("layernorm_2.weight") {
        return Some(TensorRole::Norm);
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, _) = rest.split_once('.')?;
    Some(TensorRole::Linear {
        layer: layer.parse().ok()?,
    })
}

/// The weights of a checkpoint: one or more memory-mapped safetensors files.
pub struct Weights {
    files: Vec<SafetensorsFile>,
    /// tensor name -> index into `files`
    map: HashMap<String, usize>,
    /// The shard index, if the weights are sharded.
    pub index_path: Option<PathBuf>,
}

/// A zero-copy view of one tensor.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    pub file: &'a Path,
    pub bytes: &'a [u8],
}

impl TensorView<'_> {
    pub fn name(&self) -> &str {
        &self.info.name
    }
    pub fn dtype(&self) -> DType {
        self.info.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.info.shape
    }
    /// The values as f32 (exact for BF16, F16 and F32), widened in parallel.
    pub fn to_f32(&self) -> Vec<f32> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let es = self.info.dtype.size();
        let mut out = vec![0f32; self.info.numel()];
        out.par_chunks_mut(CHUNK)
            .zip(self.bytes.par_chunks(CHUNK * es))
            .for_each(|(o, b)| decode_f32(self.info.dtype, b, o));
        out
    }
}

/// Whether every value is finite. Branch-free, so it vectorises: a row is checked in a fraction of
/// the time its quantization takes; [`first_non_finite`] then finds the culprit for the message.
pub fn all_finite(x: &[f32]) -> bool {
    x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)) < 0x7f80_0000
}

/// The index and value of the first NaN or infinity.
pub fn first_non_finite(x: &[f32]) -> Option<(usize, f32)> {
    if all_finite(x) {
        return None;
    }
    x.iter().position(|v| !v.is_finite()).map(|i| (i, x[i]))
}

/// Widens little-endian `bytes` of a float dtype into `out` (`out.len()` elements).
pub fn decode_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        other => panic!("decode_f32 called on {other}; checkpoint dtypes are checked at open"),
    }
}

impl Weights {
    /// Opens `model.safetensors.index.json` (if present) or `model.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let (names, index): (Vec<String>, Option<(PathBuf, BTreeMap<String, String>)>) = if index_path.exists() {
            let map = read_shard_index(&index_path)?;
            let mut files: Vec<String> = map.values().cloned().collect();
            files.sort();
            files.dedup();
            (files, Some((index_path, map)))
        } else if single.exists() || single.is_symlink() {
            (vec!["model.safetensors".into()], None)
        } else {
            return Err(Error::file(
                dir,
                "no weights: neither model.safetensors nor model.safetensors.index.json is present",
            ));
        };
        let mut files = Vec::with_capacity(names.len());
        let mut map = HashMap::new();
        for (fi, name) in names.iter().enumerate() {
            let path = dir.join(name);
            if !path.is_file() {
                // Say what is there instead, so that a link loop, a folder or a device is not
                // reported as missing.
                let what = match (std::fs::symlink_metadata(&path), std::fs::metadata(&path)) {
                    (Err(_), _) => None,
                    (Ok(_), Err(e)) => Some(format!("is a symbolic link that does not resolve to a file ({e})")),
                    (Ok(_), Ok(m)) if m.is_dir() => Some("is a directory, not a safetensors file".to_string()),
                    (Ok(_), Ok(_)) => Some("is not a regular file (a device, FIFO or socket): weights are read only from regular files".to_string()),
                };
                if let Some(what) = what {
                    return Err(Error::file(&path, what));
                }
                let idx = index.as_ref().map(|(p, _)| p.clone()).unwrap_or_default();
                return Err(Error::file(&idx, format!("names shard `{name}`, which does not exist in {}", dir.display())));
            }
            let f = SafetensorsFile::open(&path)?;
            for t in f.tensors() {
                if let Some(prev) = map.insert(t.name.clone(), fi) {
                    return Err(Error::tensor(
                        &path,
                        &t.name,
                        format!("also present in {}", names[prev]),
                    ));
                }
            }
            files.push(f);
        }
        if let Some((ipath, wm)) = &index {
            for (tensor, shard) in wm {
                match map.get(tensor) {
                    Some(&fi) if names[fi] == *shard => {}
                    Some(&fi) => {
                        return Err(Error::tensor(
                            ipath,
                            tensor,
                            format!("index says shard `{shard}` but it is in `{}`", names[fi]),
                        ))
                    }
                    None => {
                        return Err(Error::tensor(
                            ipath,
                            tensor,
                            format!("listed in the index but absent from shard `{shard}`"),
                        ))
                    }
                }
            }
        }
        Ok(Weights {
            files,
            map,
            index_path: index.map(|(p, _)| p),
        })
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// A tensor by HF name.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let f = &self.files[*self.map.get(name)?];
        Some(TensorView {
            info: f.info(name)?,
            file: f.path(),
            bytes: f.bytes(name)?,
        })
    }

    /// Releases a consumed tensor's pages from resident memory (see `SafetensorsFile::release`).
    pub fn release(&self, name: &str) {
        if let Some(&fi) = self.map.get(name) {
            self.files[fi].release(name);
        }
    }

    /// All tensors, file by file, in data order.
    pub fn iter(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.files.iter().flat_map(|f| {
            f.tensors().iter().map(move |t| TensorView {
                info: t,
                file: f.path(),
                bytes: f.bytes(&t.name).expect("listed tensor"),
            })
        })
    }

    /// Bytes on disk of all weight files.
    pub fn bytes_on_disk(&self) -> u64 {
        self.files.iter().map(|f| f.file_len() as u64).sum()
    }
}

/// Reads the `weight_map` of a shard index, refusing shard names that leave the directory.
fn read_shard_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).at(path)?;
    parse_shard_index(&text, path)
}

/// A name that can only refer to a file directly inside a directory: one normal path component,
/// no backslash (a Windows separator).
pub fn is_plain_file_name(name: &str) -> bool {
    let p = Path::new(name);
    p.components().count() == 1
        && matches!(p.components().next(), Some(std::path::Component::Normal(_)))
        && !name.contains('\\')
}

/// Parses a `model.safetensors.index.json` (the text of the file at `path`) into tensor -> shard.
/// Every shard must be a plain file name (no directories, no `..`, not absolute). Never panics.
pub fn parse_shard_index(text: &str, path: &Path) -> Result<BTreeMap<String, String>> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    let wm = v
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| Error::file(path, "no `weight_map` object"))?;
    let mut out = BTreeMap::new();
    for (tensor, shard) in wm {
        let shard = shard
            .as_str()
            .ok_or_else(|| Error::tensor(path, tensor, "weight_map value is not a file name"))?;
        if !is_plain_file_name(shard) {
            return Err(Error::tensor(
                path,
                tensor,
                format!("shard path `{shard}` is not a plain file name inside the checkpoint directory"),
            ));
        }
        out.insert(tensor.clone(), shard.to_string());
    }
    if out.is_empty() {
        return Err(Error::file(path, "`weight_map` is empty"));
    }
    Ok(out)
}

/// The tokenizer files of a checkpoint.
pub struct TokenizerFiles {
    pub tokenizer_json: Option<PathBuf>,
    /// Parsed `tokenizer_config.json`, kept whole for writers (chat template, special tokens).
    pub tokenizer_config: Option<serde_json::Map<String, Value>>,
    /// `chat_template.jinja` (or `chat_template.json`'s template), where newer `transformers` saves
    /// the template instead of in `tokenizer_config.json`.
    pub chat_template_file: Option<String>,
    /// Files a writer copies byte for byte when present.
    pub extra_files: Vec<PathBuf>,
}

impl TokenizerFiles {
    /// `tokenizer_config.json` with its `chat_template` taken from `chat_template.jinja` when the
    /// config has none (as `transformers` and llama.cpp's converter read them).
    pub fn config_with_template(&self) -> Option<serde_json::Map<String, Value>> {
        let mut cfg = self.tokenizer_config.clone();
        if let Some(t) = &self.chat_template_file {
            let c = cfg.get_or_insert_with(Default::default);
            c.entry("chat_template").or_insert_with(|| Value::String(t.clone()));
        }
        cfg
    }

    /// The default chat template: the config's string, the `default` entry of its list form, or
    /// `chat_template.jinja`.
    pub fn chat_template(&self) -> Option<String> {
        crate::gguf::tokenizer::chat_templates(self.config_with_template().as_ref()).0
    }

    /// Loads `tokenizer.json` with the `tokenizers` crate.
    pub fn load(&self) -> Result<tokenizers::Tokenizer> {
        let p = self
            .tokenizer_json
            .as_ref()
            .ok_or_else(|| Error::Usage("the checkpoint has no tokenizer.json".into()))?;
        tokenizers::Tokenizer::from_file(p).map_err(|e| Error::file(p, format!("not a valid tokenizer: {e}")))
    }
}

/// A checked HF Ouro checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: OuroConfig,
    pub weights: Weights,
    pub tokenizer: TokenizerFiles,
    /// Tensors present in the files that an Ouro model does not use.
    pub extra_tensors: Vec<String>,
    /// Non-fatal findings worth telling the user.
    pub warnings: Vec<String>,
}

impl Checkpoint {
    /// The checkpoint folder's name, which default output names start with (`Ouro-1.4B-Q4_K_M.gguf`,
    /// `Ouro-1.4B-4bit`), as llama.cpp's converter and mlx-community name files.
    pub fn folder_name(&self) -> String {
        self.dir
            .canonicalize()
            .unwrap_or_else(|_| self.dir.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ouro".into())
    }

    /// Opens and checks the checkpoint in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::file(&dir, "not a directory (expected an HF Ouro checkpoint directory)"));
        }
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            let empty = std::fs::read_dir(&dir).at(&dir)?.next().is_none();
            return Err(Error::file(
                &dir,
                if empty {
                    "directory is empty: expected an HF Ouro checkpoint (config.json, model.safetensors, tokenizer.json)"
                } else {
                    "no config.json: not an HF checkpoint directory"
                },
            ));
        }
        let config = OuroConfig::from_file(&cfg_path)?;
        if config.raw.contains_key("quantization") {
            return Err(Error::file(
                &dir,
                "is an MLX directory (config.json has `quantization`), already converted: convert reads the original HF \
                 checkpoint; `inspect` describes MLX directories and `run`/`validate` use them",
            ));
        }
        let weights = Weights::open(&dir)?;
        let mut warnings = vec![];
        let expected = expected_tensors(&config);
        let mut dtypes = std::collections::BTreeSet::new();
        for e in &expected {
            let Some(t) = weights.get(&e.name) else {
                let where_ = weights
                    .index_path
                    .clone()
                    .unwrap_or_else(|| dir.join("model.safetensors"));
                return Err(Error::tensor(
                    where_,
                    &e.name,
                    format!("missing (an Ouro model with this config.json needs it, shape {:?})", e.shape),
                ));
            };
            if !t.dtype().is_weight_float() {
                return Err(Error::tensor(
                    t.file,
                    &e.name,
                    format!("dtype {} is not supported (expected BF16, F16 or F32)", t.dtype()),
                ));
            }
            if t.shape() != e.shape.as_slice() {
                return Err(Error::tensor(
                    t.file,
                    &e.name,
                    format!("shape {:?} disagrees with config.json, which implies {:?}", t.shape(), e.shape),
                ));
            }
            dtypes.insert(t.dtype());
        }
        if dtypes.len() > 1 {
            warnings.push(format!(
                "weights mix dtypes {}",
                dtypes.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ")
            ));
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
        let extra_tensors: Vec<String> = weights
            .iter()
            .filter(|t| !known.contains(t.name()))
            .map(|t| t.name().to_string())
            .collect();
        // A layer the config does not have means the config and the weights disagree: converting
        // would silently drop it.
        let n_layers = config.num_hidden_layers;
        if let Some(name) = extra_tensors.iter().find(|n| {
            n.strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i >= n_layers)
        }) {
            let t = weights.get(name).expect("listed");
            return Err(Error::tensor(
                t.file,
                name,
                format!("belongs to a layer beyond the {n_layers} that config.json's num_hidden_layers declares: the config does not describe these weights"),
            ));
        }
        // README promises every dtype other than BF16/F16/F32 is refused by name: extra tensors too.
        if let Some(t) = extra_tensors.iter().filter_map(|n| weights.get(n)).find(|t| !t.dtype().is_weight_float()) {
            return Err(Error::tensor(
                t.file,
                t.name(),
                format!("dtype {} is not supported (expected BF16, F16 or F32; the tensor is not an Ouro weight either)", t.dtype()),
            ));
        }
        if !extra_tensors.is_empty() {
            warnings.push(format!(
                "{} tensor(s) not used by an Ouro model are ignored: {}",
                extra_tensors.len(),
                extra_tensors.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        for c in &config.corrections {
            warnings.push(format!(
                "config.json `{}` = {} is an upstream fault; outputs use {} ({})",
                c.key, c.found, c.corrected, c.why
            ));
        }
        let tokenizer = read_tokenizer_files(&dir, &mut warnings)?;
        if let Some(tj) = &tokenizer.tokenizer_json {
            // Every token id needs an embedding row: a GGUF with more tokens than rows does not load.
            let tok = tokenizer.load()?;
            if let Some((text, id)) = tok.get_vocab(true).into_iter().filter(|(_, id)| *id as usize >= config.vocab_size).max_by_key(|(_, id)| *id) {
                return Err(Error::file(
                    tj,
                    format!(
                        "token {text:?} has id {id}, outside the model's vocabulary of {} (config.json `vocab_size`): the embedding has no row for it",
                        config.vocab_size
                    ),
                ));
            }
        }
        Ok(Checkpoint {
            dir,
            config,
            weights,
            tokenizer,
            extra_tensors,
            warnings,
        })
    }

    /// The dtype of the weights (the embedding's; see `warnings` for mixed files).
    pub fn dtype(&self) -> DType {
        self.weights
            .get("model.embed_tokens.weight")
            .map(|t| t.dtype())
            .unwrap_or(DType::F32)
    }

    /// A tensor the model uses, by HF name (present: checked at open).
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.weights
            .get(name)
            .ok_or_else(|| Error::tensor(&self.dir, name, "missing from the checkpoint"))
    }
}

pub(crate) fn read_tokenizer_files(dir: &Path, warnings: &mut Vec<String>) -> Result<TokenizerFiles> {
    let tj = dir.join("tokenizer.json");
    let tokenizer_json = if tj.is_file() {
        // Check it is a loadable tokenizer now, so that a broken file is reported at open.
        let tok = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| Error::file(&tj, format!("not a valid tokenizer: {e}")))?;
        for (id, want) in [
            (config::ENDOFTEXT_ID, "<|endoftext|>"),
            (config::IM_START_ID, "<|im_start|>"),
            (config::IM_END_ID, "<|im_end|>"),
        ] {
            if tok.id_to_token(id).as_deref() != Some(want) {
                warnings.push(format!(
                    "tokenizer.json: id {id} is {:?}, not {want} as in Ouro's tokenizer",
                    tok.id_to_token(id)
                ));
            }
        }
        Some(tj)
    } else {
        warnings.push("no tokenizer.json: converting and running need one".into());
        None
    };
    let tc = dir.join("tokenizer_config.json");
    let tokenizer_config = if tc.is_file() {
        let text = std::fs::read_to_string(&tc).at(&tc)?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => Some(m),
            Ok(_) => return Err(Error::file(&tc, "must hold a JSON object")),
            Err(e) => return Err(Error::file(&tc, format!("not valid JSON: {e}"))),
        }
    } else {
        None
    };
    let jinja = dir.join("chat_template.jinja");
    let ctjson = dir.join("chat_template.json");
    let chat_template_file = if jinja.is_file() {
        Some(std::fs::read_to_string(&jinja).at(&jinja)?)
    } else if ctjson.is_file() {
        let text = std::fs::read_to_string(&ctjson).at(&ctjson)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(&ctjson, format!("not valid JSON: {e}")))?;
        Some(
            v.get("chat_template")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::file(&ctjson, "no string `chat_template`"))?
                .to_string(),
        )
    } else {
        None
    };
    let extra_files = [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "chat_template.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
    ]
    .iter()
    .map(|f| dir.join(f))
    .filter(|p| p.is_file())
    .collect();
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config,
        chat_template_file,
        extra_files,
    })
}
