//! Per-tensor type choice for a GGUF file type, following llama.cpp's `src/llama-quant.cpp`
//! (`llama_tensor_get_type`) for the mixes implemented here.

use serde::Serialize;

use crate::checkpoint::{tensor_role, OuroConfig, TensorRole};
use crate::quant::ggml::GgmlType;

/// A GGUF file type (llama-quantize's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[allow(non_camel_case_types)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_K_M,
}

impl FileType {
    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "F32",
            FileType::F16 => "F16",
            FileType::BF16 => "BF16",
            FileType::Q8_0 => "Q8_0",
            FileType::Q4_K_M => "Q4_K_M",
        }
    }
}

/// llama.cpp's `use_more_bits`: the layers that get more bits in the _M mixes.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i >= n / 8 && (i - n / 8) % 3 == 2)
}

/// The type llama-quantize would give the 2-D tensor `hf_name` of shape `[rows, cols]`; 1-D
/// tensors (norms, the gate bias) stay F32.
pub fn tensor_type(ft: FileType, cfg: &OuroConfig, hf_name: &str, shape: &[usize]) -> GgmlType {
    if shape.len() < 2 || shape.iter().filter(|&&d| d > 1).count() < 2 {
        return GgmlType::F32;
    }
    let cols = *shape.last().expect("2-D");
    let want = match ft {
        FileType::F32 => return GgmlType::F32,
        FileType::F16 => return GgmlType::F16,
        FileType::BF16 => return GgmlType::BF16,
        FileType::Q8_0 => GgmlType::Q8_0,
        FileType::Q4_K_M => match tensor_role(hf_name) {
            Some(TensorRole::LmHead) => GgmlType::Q6_K,
            Some(TensorRole::Linear { layer }) if hf_name.ends_with("v_proj.weight") => {
                if use_more_bits(layer, cfg.num_hidden_layers) {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q4_K
                }
            }
            // llama-quantize counts ffn_down over the unrolled (looped) layers.
            Some(TensorRole::Linear { layer }) if hf_name.ends_with("down_proj.weight") => {
                if use_more_bits(layer, cfg.num_hidden_layers * cfg.total_ut_steps) {
                    GgmlType::Q6_K
                } else {
                    GgmlType::Q4_K
                }
            }
            _ => GgmlType::Q4_K,
        },
    };
    fallback(want, cols)
}

/// llama-quantize's replacement when a row is not a whole number of blocks.
pub fn fallback(t: GgmlType, cols: usize) -> GgmlType {
    if cols.is_multiple_of(t.block_size()) {
        return t;
    }
    let alt = match t {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::IQ4_NL => GgmlType::IQ4_NL,
        _ => GgmlType::F16,
    };
    if cols.is_multiple_of(alt.block_size()) {
        alt
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_on_ouro_1_4b_gives_16_q6k_ffn_down() {
        let cfg = OuroConfig::from_map(
            crate::synth::preset_config(crate::synth::Preset::Ouro1_4b, None)
                .as_object()
                .unwrap()
                .clone(),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let count = |suffix: &str| {
            (0..24)
                .filter(|l| {
                    let n = format!("model.layers.{l}.{suffix}");
                    tensor_type(FileType::Q4_K_M, &cfg, &n, &[2048, 2048]) == GgmlType::Q6_K
                })
                .count()
        };
        assert_eq!(count("mlp.down_proj.weight"), 16);
        assert_eq!(count("self_attn.v_proj.weight"), 12);
        assert_eq!(count("self_attn.q_proj.weight"), 0);
        assert_eq!(tensor_type(FileType::Q4_K_M, &cfg, "lm_head.weight", &[49152, 2048]), GgmlType::Q6_K);
        assert_eq!(tensor_type(FileType::Q4_K_M, &cfg, "model.norm.weight", &[2048]), GgmlType::F32);
        assert_eq!(tensor_type(FileType::Q4_K_M, &cfg, "model.early_exit_gate.weight", &[1, 2048]), GgmlType::F32);
        assert_eq!(fallback(GgmlType::Q4_K, 64), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q8_0, 48), GgmlType::F16);
    }
}
