//! The memory planner: for each output format, the bytes of the weights, of the KV cache at a
//! context, and of the runtime around them, against a device's free memory.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{expected_tensors, OuroConfig};
use crate::error::{Error, Result};
use crate::gguf::arch::tensor_map;
use crate::gguf::mix::{tensor_type_with, FileType};
use crate::mlx::MlxOptions;

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
            .map_err(|e| Error::config(origin, &name, format!("not a device profile (description, memory, taken): {e}")))?;
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

/// Weight bytes of a GGUF output of file type `ft` as a runtime holds them: the tensor data (norms
/// in F32) and the exit gate, which the file keeps in metadata (`hidden + 1` f32). The mixes that
/// need an importance matrix are sized as made with one.
pub fn gguf_weight_bytes(cfg: &OuroConfig, ft: FileType) -> u64 {
    let with_imatrix = ft.needs_importance();
    (cfg.hidden_size as u64 + 1) * 4
        + tensor_map(cfg)
        .iter()
        .map(|m| {
            let e = expected_tensors(cfg).into_iter().find(|e| e.name == m.hf_name).expect("mapped tensor");
            let ty = tensor_type_with(ft, cfg, &m.gguf_name, &e.shape, &[], with_imatrix);
            let cols = *e.shape.last().expect("shape");
            (e.shape.iter().product::<usize>() / cols * ty.row_bytes(cols)) as u64
        })
        .sum::<u64>()
}

/// Weight bytes of an MLX output (scales, biases and float tensors in a 2-byte dtype).
pub fn mlx_weight_bytes(cfg: &OuroConfig, opts: &MlxOptions) -> u64 {
    expected_tensors(cfg)
        .iter()
        .map(|e| {
            let numel: usize = e.shape.iter().product();
            let module = e.name.strip_suffix(".weight").unwrap_or(&e.name);
            match (e.shape.len(), opts.quant_for(module, *e.shape.last().unwrap_or(&1), cfg.num_hidden_layers)) {
                (2, Some((bits, gs))) => (numel * bits as usize / 8 + 2 * 2 * numel / gs) as u64,
                _ => numel as u64 * 2,
            }
        })
        .sum()
}

/// Runtime memory besides weights and KV: a fixed 256 MiB for the runtime and its buffers, plus
/// the activations and logits of a 512-token prefill batch in f32 (an estimate, stated as such).
pub fn overhead_bytes(cfg: &OuroConfig) -> u64 {
    256 * (1 << 20) + 512 * (cfg.vocab_size + 16 * cfg.hidden_size) as u64 * 4
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
pub fn formats(cfg: &OuroConfig) -> Vec<(String, u64)> {
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
        v.push((format!("GGUF {}", ft.name()), gguf_weight_bytes(cfg, ft)));
    }
    for (bits, gs, label) in [(None, 64, "MLX bf16"), (Some(8), 64, "MLX 8bit"), (Some(4), 64, "MLX 4bit"), (Some(4), 32, "MLX 4bit-gs32"), (Some(3), 64, "MLX 3bit"), (Some(2), 64, "MLX 2bit")] {
        let o = MlxOptions::new(bits, gs, None, false).expect("valid");
        v.push((label.to_string(), mlx_weight_bytes(cfg, &o)));
    }
    v
}

/// Plans every format for `budget` bytes at `ctx` tokens.
pub fn plan(cfg: &OuroConfig, budget: u64, ctx: usize, shared_last: bool, kv: KvDtype) -> Vec<FormatPlan> {
    let per_token = kv_bytes_per_token(cfg, shared_last, kv);
    let overhead = overhead_bytes(cfg);
    formats(cfg)
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
        for p in plan(&c, 6_000_000_000, 4096, false, KvDtype::F16) {
            if p.max_ctx > 0 && p.max_ctx < c.max_position_embeddings {
                let per = kv_bytes_per_token(&c, false, KvDtype::F16);
                let at = |n: usize| p.weight_bytes + p.overhead_bytes + (per * n as f64).ceil() as u64;
                assert!(at(p.max_ctx) <= 6_000_000_000 && at(p.max_ctx + 1) > 6_000_000_000, "{}", p.format);
            }
        }
    }
}
