//! The memory planner: for each output format, the bytes of the weights, of the KV cache at a
//! context, and of the runtime around them, against a device's free memory. Weights are counted
//! as the loader holds them on the device's kind ([`crate::model::placement`]): on a CUDA GPU
//! only what lies in its memory (the GGUF embedding stays in host memory; types without a GPU
//! kernel are widened to f32), on the CPU and on unified-memory GPUs everything.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{expected_tensors, OuroConfig};
use crate::error::{Error, Result};
use crate::gguf::arch::tensor_map;
use crate::gguf::mix::{tensor_type_with, FileType};
use crate::mlx::MlxOptions;
use crate::model::placement::{self, Stored, Target};

/// The shipped device profiles.
pub const DEVICES_TOML: &str = include_str!("../formats/devices.toml");

/// A device: its memory and what other work already holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Device {
    #[serde(skip_deserializing)]
    pub name: String,
    pub description: String,
    pub memory: u64,
    #[serde(default)]
    pub taken: u64,
    /// Where models run on it: `cpu` (the default), `cuda` or `metal`.
    #[serde(default = "cpu")]
    pub kind: Target,
}

fn cpu() -> Target {
    Target::Cpu
}

impl Device {
    pub fn free(&self) -> u64 {
        self.memory.saturating_sub(self.taken)
    }
}

/// Parses device profiles from TOML (`[name]` tables with `description`, `memory`, `taken`).
pub fn parse_devices(text: &str, origin: &Path) -> Result<Vec<Device>> {
    let table: toml::Table = text.parse().map_err(|e| Error::file(origin, format!("not valid TOML: {e}")))?;
    let mut out = vec![];
    for (name, v) in table {
        let mut d: Device = v
            .try_into()
            .map_err(|e| Error::config(origin, &name, format!("not a device profile (description, memory, taken, kind = cpu|cuda|metal): {e}")))?;
        if d.taken > d.memory {
            return Err(Error::config(origin, &name, format!("taken ({}) exceeds memory ({})", d.taken, d.memory)));
        }
        d.name = name;
        out.push(d);
    }
    Ok(out)
}

/// The shipped profiles, then those of `extra` (which override same-named ones).
pub fn devices(extra: Option<&Path>) -> Result<Vec<Device>> {
    let mut all = parse_devices(DEVICES_TOML, Path::new("formats/devices.toml"))?;
    if let Some(p) = extra {
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        for d in parse_devices(&text, p)? {
            all.retain(|x| x.name != d.name);
            all.push(d);
        }
    }
    Ok(all)
}

/// Storage of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum KvDtype {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

impl KvDtype {
    /// Bytes per element (Q8_0: 34 bytes per 32 values).
    pub fn bytes(self) -> f64 {
        match self {
            KvDtype::F32 => 4.0,
            KvDtype::F16 => 2.0,
            KvDtype::Q8_0 => 34.0 / 32.0,
        }
    }
}

/// KV-cache bytes per token: keys and values of every slot (`T * L` slots in full mode, `L` with
/// one slot per layer).
pub fn kv_bytes_per_token(cfg: &OuroConfig, shared_last: bool, dtype: KvDtype) -> f64 {
    let slots = if shared_last { cfg.num_hidden_layers } else { cfg.kv_slots() };
    2.0 * (slots * cfg.num_key_value_heads * cfg.head_dim) as f64 * dtype.bytes()
}

/// The shape of an Ouro tensor as `(rows, cols)` (a vector is one row).
fn rows_cols(cfg: &OuroConfig, hf_name: &str) -> anyhow::Result<(usize, usize)> {
    let e = expected_tensors(cfg)
        .into_iter()
        .find(|e| e.name == hf_name)
        .ok_or_else(|| anyhow::anyhow!("internal: {hf_name} is not an Ouro tensor"))?;
    let cols = *e.shape.last().unwrap_or(&1);
    Ok((e.shape.iter().product::<usize>() / cols.max(1), cols))
}

/// Weight bytes of a GGUF output of file type `ft` as the runner holds them on `target` (see
/// [`placement`]). The mixes that need an importance matrix are sized as made with one.
pub fn gguf_weight_bytes(cfg: &OuroConfig, ft: FileType, target: Target) -> u64 {
    let with_imatrix = ft.needs_importance();
    let map = tensor_map(cfg);
    let stored = |name: &str| -> anyhow::Result<(Stored, usize, usize)> {
        let m = map.iter().find(|m| m.hf_name == name).ok_or_else(|| anyhow::anyhow!("internal: {name} has no GGUF name"))?;
        let (rows, cols) = rows_cols(cfg, name)?;
        let shape = if rows == 1 { vec![cols] } else { vec![rows, cols] };
        Ok((Stored::Ggml(tensor_type_with(ft, cfg, &m.gguf_name, &shape, &[], with_imatrix)), rows, cols))
    };
    placement::model_bytes(cfg, target, &stored).expect("every Ouro tensor has a GGUF name").counted(target)
}

/// Weight bytes of an MLX output (scales, biases and float tensors in a 2-byte dtype) as the
/// runner holds them on `target`.
pub fn mlx_weight_bytes(cfg: &OuroConfig, opts: &MlxOptions, target: Target) -> u64 {
    let stored = |name: &str| -> anyhow::Result<(Stored, usize, usize)> {
        let (rows, cols) = rows_cols(cfg, name)?;
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let s = match opts.quant_for(module, cols, cfg.num_hidden_layers) {
            Some((bits, group)) if rows > 1 => Stored::Affine { bits, group, scale_width: Some(2) },
            _ => Stored::Float { width: 2 },
        };
        Ok((s, rows, cols))
    };
    placement::model_bytes(cfg, target, &stored).expect("every Ouro tensor has a shape").counted(target)
}

/// The tokens of the prefill batch `plan` sizes the runtime's scratch for.
pub const PLAN_BATCH: usize = 512;

/// Runtime memory besides weights and KV on `target`: a fixed 256 MiB for the process and its
/// buffers on the CPU or unified memory, the scratch of a 512-token forward pass
/// ([`placement::scratch_bytes`]), and on CUDA the context and libraries
/// ([`placement::CUDA_RUNTIME_BYTES`]). Estimates, stated as such.
pub fn overhead_bytes(cfg: &OuroConfig, target: Target) -> u64 {
    let process = if target == Target::Cuda { 0 } else { 256 << 20 };
    process + placement::scratch_bytes(cfg, PLAN_BATCH) + placement::runtime_bytes(target)
}

/// One output format against a budget.
#[derive(Debug, Clone, Serialize)]
pub struct FormatPlan {
    pub format: String,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub overhead_bytes: u64,
    pub total_bytes: u64,
    pub fits: bool,
    /// The longest context that fits (capped at `max_position_embeddings`); 0 if the weights
    /// alone do not fit.
    pub max_ctx: usize,
}

/// The formats `convert` writes, with their weight bytes.
pub fn formats(cfg: &OuroConfig, target: Target) -> Vec<(String, u64)> {
    let mut v = vec![];
    // the low-bit i-quants need an importance matrix (`ouro-quant imatrix`) for all but IQ3_S/IQ3_M
    for ft in [
        FileType::F16,
        FileType::Q8_0,
        FileType::Q6_K,
        FileType::Q4_K_M,
        FileType::Q4_0,
        FileType::IQ4_XS,
        FileType::IQ3_M,
        FileType::IQ3_S,
        FileType::IQ3_XXS,
        FileType::IQ2_M,
        FileType::IQ2_S,
        FileType::IQ2_XS,
        FileType::IQ1_M,
    ] {
        v.push((format!("GGUF {}", ft.name()), gguf_weight_bytes(cfg, ft, target)));
    }
    for (bits, gs, label) in [(None, 64, "MLX bf16"), (Some(8), 64, "MLX 8bit"), (Some(4), 64, "MLX 4bit"), (Some(4), 32, "MLX 4bit-gs32"), (Some(3), 64, "MLX 3bit"), (Some(2), 64, "MLX 2bit")] {
        let o = MlxOptions::new(bits, gs, None, false).expect("valid");
        v.push((label.to_string(), mlx_weight_bytes(cfg, &o, target)));
    }
    v
}

/// Plans every format for `budget` bytes of a `target` device at `ctx` tokens.
pub fn plan(cfg: &OuroConfig, budget: u64, ctx: usize, shared_last: bool, kv: KvDtype, target: Target) -> Vec<FormatPlan> {
    let per_token = kv_bytes_per_token(cfg, shared_last, kv);
    let overhead = overhead_bytes(cfg, target);
    formats(cfg, target)
        .into_iter()
        .map(|(format, weight_bytes)| {
            // f64 -> u64 saturates; the sums saturate too, so an absurd context reads as not fitting.
            let kv_bytes = (per_token * ctx as f64).ceil() as u64;
            let total = weight_bytes.saturating_add(kv_bytes).saturating_add(overhead);
            let room = budget.saturating_sub(weight_bytes.saturating_add(overhead));
            let max_ctx = ((room as f64 / per_token).floor() as usize).min(cfg.max_position_embeddings);
            FormatPlan {
                format,
                weight_bytes,
                kv_bytes,
                overhead_bytes: overhead,
                total_bytes: total,
                fits: total <= budget && ctx <= cfg.max_position_embeddings,
                max_ctx,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(preset: crate::synth::Preset) -> OuroConfig {
        let v = crate::synth::preset_config(preset, None);
        OuroConfig::from_map(v.as_object().unwrap().clone(), Path::new("preset")).unwrap()
    }

    #[test]
    fn kv_per_token_matches_the_spec() {
        // spec section 3: 0.75 MiB per token for 1.4B in bf16, 1.5 MiB for 2.6B
        let c = cfg(crate::synth::Preset::Ouro1_4b);
        assert_eq!(kv_bytes_per_token(&c, false, KvDtype::F16), 0.75 * 1048576.0);
        assert_eq!(kv_bytes_per_token(&c, true, KvDtype::F16), 0.75 * 1048576.0 / 4.0);
        let c = cfg(crate::synth::Preset::Ouro2_6b);
        assert_eq!(kv_bytes_per_token(&c, false, KvDtype::F16), 1.5 * 1048576.0);
    }

    #[test]
    fn shipped_profiles_parse_and_bad_ones_are_named() {
        let d = devices(None).unwrap();
        let b = d.iter().find(|d| d.name == "bluefin").unwrap();
        assert_eq!(b.free(), 12884901888 - 7400000000);
        assert!(d.iter().any(|d| d.name == "bmasass") && d.iter().any(|d| d.name == "cpu-only"));
        let e = parse_devices("[x]\ndescription = \"a\"\nmemory = 5\ntaken = 9\n", Path::new("d.toml")).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("exceeds"), "{e}");
        let e = parse_devices("[y]\nmemory = \"lots\"\n", Path::new("d.toml")).unwrap_err().to_string();
        assert!(e.contains("`y`"), "{e}");
    }

    #[test]
    fn max_ctx_is_the_longest_that_fits() {
        let c = cfg(crate::synth::Preset::Ouro1_4b);
        for p in plan(&c, 6_000_000_000, 4096, false, KvDtype::F16, Target::Cpu) {
            if p.max_ctx > 0 && p.max_ctx < c.max_position_embeddings {
                let per = kv_bytes_per_token(&c, false, KvDtype::F16);
                let at = |n: usize| p.weight_bytes + p.overhead_bytes + (per * n as f64).ceil() as u64;
                assert!(at(p.max_ctx) <= 6_000_000_000 && at(p.max_ctx + 1) > 6_000_000_000, "{}", p.format);
            }
        }
    }
}
