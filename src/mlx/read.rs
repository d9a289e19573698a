//! Reads an MLX model directory (ours, or one in the same layout): the config, the shard index and
//! the affine-quantized `weight`/`scales`/`biases` triples, as stored ([`MlxDir::stored`]) or
//! dequantized with MLX's formula `scale * q + bias` (scale and bias widened to f32 from their
//! stored dtype; [`MlxDir::tensor_f32`]).

use std::path::{Path, PathBuf};

use crate::checkpoint::{decode_f32, expected_tensors, OuroConfig, Weights};
use crate::error::{Error, Result};
use crate::stfile::DType;

use super::affine;

/// A tensor as an MLX directory stores it (little-endian bytes of the safetensors file).
pub enum Stored<'a> {
    Float { dtype: DType, bytes: &'a [u8], shape: Vec<usize> },
    /// Affine-quantized: `shape` is the matrix's `[rows, cols]`; the words hold `bits` per weight,
    /// scales and biases one per `group` weights, each with its own dtype.
    Quantized {
        shape: Vec<usize>,
        bits: u32,
        group: usize,
        words: &'a [u8],
        scales: (DType, &'a [u8]),
        biases: (DType, &'a [u8]),
    },
}

/// An MLX directory opened for reading.
pub struct MlxDir {
    pub dir: PathBuf,
    pub config: OuroConfig,
    pub weights: Weights,
}

/// Whether `dir` holds an MLX conversion: its `config.json` has a `quantization` section or
/// names a `model_file`.
pub fn is_mlx_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .map(|v| v.get("quantization").is_some() || v.get("model_file").is_some())
        .unwrap_or(false)
}

impl MlxDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let config = OuroConfig::from_file(dir.join("config.json"))?;
        let weights = Weights::open(dir)?;
        let me = MlxDir {
            dir: dir.to_path_buf(),
            config,
            weights,
        };
        // Every tensor the model needs is present, in float or as a consistent quantized triple.
        for e in expected_tensors(&me.config) {
            me.matrix_info(&e.name, &e.shape)?;
        }
        Ok(me)
    }

    /// What `config.json`'s `quantization` section says of `module`: `None` without a section,
    /// `Some(None)` for `false`, else `Some(Some((bits, group_size)))` (its own entry, or the
    /// top level).
    fn configured_quant(&self, module: &str) -> Result<Option<Option<(u32, usize)>>> {
        let Some(q) = self.config.raw.get("quantization") else { return Ok(None) };
        let path = self.dir.join("config.json");
        let bad = |what: &str| Error::config(&path, "quantization", format!("{what} is not valid"));
        let pair = |v: &serde_json::Value, what: &str| -> Result<(u32, usize)> {
            let b = v.get("bits").and_then(|b| b.as_u64()).ok_or_else(|| bad(&format!("{what}: `bits`")))?;
            let g = v.get("group_size").and_then(|g| g.as_u64()).ok_or_else(|| bad(&format!("{what}: `group_size`")))?;
            Ok((b as u32, g as usize))
        };
        Ok(Some(match q.get(module) {
            Some(serde_json::Value::Bool(false)) => None,
            Some(v @ serde_json::Value::Object(_)) => Some(pair(v, module)?),
            Some(_) => return Err(bad(&format!("the entry for `{module}`"))),
            None => Some(pair(q, "the top level")?),
        }))
    }

    /// For a tensor the model needs: `None` if stored in float, or `(bits, group_size)`.
    fn matrix_info(&self, hf_name: &str, shape: &[usize]) -> Result<Option<(u32, usize)>> {
        let index = self.weights.index_path.clone().unwrap_or_else(|| self.dir.join("model.safetensors"));
        let module = hf_name.strip_suffix(".weight").unwrap_or(hf_name);
        let Some(w) = self.weights.get(hf_name) else {
            return Err(Error::tensor(&index, hf_name, format!("missing (the config implies shape {shape:?})")));
        };
        let scales = self.weights.get(&format!("{module}.scales"));
        let Some(scales) = scales.filter(|_| hf_name.ends_with(".weight")) else {
            if !w.dtype().is_weight_float() || w.shape() != shape {
                return Err(Error::tensor(w.file, hf_name, format!("{} {:?}, expected a float tensor of shape {shape:?}", w.dtype(), w.shape())));
            }
            // (mlx_lm quantizes a module without `scales` only if config.json names it)
            if self.config.raw.get("quantization").and_then(|q| q.get(module)).is_some_and(|v| v.is_object()) {
                return Err(Error::config(
                    self.dir.join("config.json"),
                    "quantization",
                    format!("says `{module}` is quantized, but its weight is stored in {} without scales", w.dtype()),
                ));
            }
            return Ok(None);
        };
        let biases = self
            .weights
            .get(&format!("{module}.biases"))
            .ok_or_else(|| Error::tensor(&index, format!("{module}.biases"), "missing: a quantized module needs weight, scales and biases"))?;
        let (rows, cols) = (shape[0], shape[1]);
        let sc = scales.shape().get(1).copied().unwrap_or(0);
        let wc = w.shape().get(1).copied().unwrap_or(0);
        if w.dtype() != DType::U32 || w.shape().len() != 2 || w.shape()[0] != rows || sc == 0 || cols % sc != 0 || (wc * 32) % cols != 0 {
            return Err(Error::tensor(w.file, hf_name, format!("quantized weight {} {:?} with scales {:?} does not fit shape {shape:?}", w.dtype(), w.shape(), scales.shape())));
        }
        let (bits, gs) = ((wc * 32 / cols) as u32, cols / sc);
        if !affine::BITS.contains(&bits) || !affine::GROUP_SIZES.contains(&gs) {
            return Err(Error::tensor(w.file, hf_name, format!("{bits} bits with group size {gs} is not an MLX affine setting")));
        }
        // mlx_lm builds its layers from config.json's `quantization`, then loads the tensors: the
        // two must agree or it refuses the directory, so this reader does too.
        if let Some(said) = self.configured_quant(module)? {
            if said != Some((bits, gs)) {
                let said = said.map_or("not quantized".to_string(), |(b, g)| format!("{b} bits, group size {g}"));
                return Err(Error::config(
                    self.dir.join("config.json"),
                    "quantization",
                    format!("says {said} for `{module}`, but its tensors hold {bits} bits with group size {gs}"),
                ));
            }
        }
        for (what, t) in [("scales", scales), ("biases", biases)] {
            if !t.dtype().is_weight_float() || t.shape() != [rows, sc] {
                return Err(Error::tensor(t.file, format!("{module}.{what}"), format!("{} {:?}, expected a float tensor of shape [{rows}, {sc}]", t.dtype(), t.shape())));
            }
        }
        Ok(Some((bits, gs)))
    }

    /// How a tensor the model needs is stored, without widening it: float bytes, or the packed
    /// codes with their scales and biases (checked as [`MlxDir::open`] checks them).
    pub fn stored(&self, hf_name: &str) -> Result<Stored<'_>> {
        let shape = expected_tensors(&self.config)
            .into_iter()
            .find(|e| e.name == hf_name)
            .map(|e| e.shape)
            .ok_or_else(|| Error::Usage(format!("internal: {hf_name} is not an Ouro tensor")))?;
        let q = self.matrix_info(hf_name, &shape)?;
        let w = self.weights.get(hf_name).expect("checked");
        Ok(match q {
            None => Stored::Float { dtype: w.dtype(), bytes: w.bytes, shape },
            Some((bits, group)) => {
                let module = hf_name.strip_suffix(".weight").unwrap_or(hf_name);
                let s = self.weights.get(&format!("{module}.scales")).expect("checked");
                let b = self.weights.get(&format!("{module}.biases")).expect("checked");
                Stored::Quantized {
                    shape,
                    bits,
                    group,
                    words: w.bytes,
                    scales: (s.dtype(), s.bytes),
                    biases: (b.dtype(), b.bytes),
                }
            }
        })
    }

    /// Lets the operating system drop the pages of a module's tensors (weight, scales, biases)
    /// once they have been copied.
    pub fn release(&self, hf_name: &str) {
        let module = hf_name.strip_suffix(".weight").unwrap_or(hf_name);
        self.weights.release(hf_name);
        self.weights.release(&format!("{module}.scales"));
        self.weights.release(&format!("{module}.biases"));
    }

    /// The tensor as f32, dequantized if stored quantized, with its quantization if any.
    pub fn tensor_f32(&self, hf_name: &str) -> Result<(Vec<f32>, Vec<usize>, Option<(u32, usize)>)> {
        use rayon::prelude::*;
        Ok(match self.stored(hf_name)? {
            Stored::Float { dtype, bytes, shape } => {
                let mut out = vec![0f32; shape.iter().product()];
                decode_f32(dtype, bytes, &mut out);
                (out, shape, None)
            }
            Stored::Quantized { shape, bits, group: gs, words: w, scales: (sd, sb), biases: (bd, bb) } => {
                let cols = shape[1];
                let mut out = vec![0f32; shape[0] * cols];
                let (wpr, gpr) = (cols * bits as usize / 32, cols / gs);
                let (ss, bs) = (sd.size(), bd.size());
                out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
                    let words: Vec<u32> = w[r * wpr * 4..(r + 1) * wpr * 4]
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    let mut sc = vec![0f32; gpr];
                    let mut bi = vec![0f32; gpr];
                    decode_f32(sd, &sb[r * gpr * ss..(r + 1) * gpr * ss], &mut sc);
                    decode_f32(bd, &bb[r * gpr * bs..(r + 1) * gpr * bs], &mut bi);
                    affine::dequantize_row(&words, &sc, &bi, bits, gs, row);
                });
                (out, shape, Some((bits, gs)))
            }
        })
    }
}
