//! Per-tensor type choice for a GGUF file type, following llama.cpp's `src/llama-quant.cpp`
//! (`llama_tensor_get_type`, with and without an importance matrix) for the mixes users ask for. Tensor names are
//! GGUF names (`blk.{i}.attn_v.weight`, ...), as llama-quantize sees them.
//!
//! Looped models: llama-quantize counts `ffn_down` layers over the unrolled depth
//! (`n_layer_all` = layers x loops), so the "more bits" layers of ffn_down are those of a 96-layer
//! model for Ouro-1.4B (16 of its 24 ffn_down tensors get Q6_K in Q4_K_M). `attn_v` counts the
//! physical layers.

use serde::Serialize;

use crate::checkpoint::OuroConfig;
use crate::quant::ggml::GgmlType;

/// A GGUF file type (llama-quantize's names) and its `general.file_type` id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[allow(non_camel_case_types)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6_K,
    Q5_K_M,
    Q5_K_S,
    Q4_K_M,
    Q4_K_S,
    Q3_K_M,
    Q4_0,
    IQ4_NL,
    Q5_1,
    Q5_0,
    Q4_1,
    Q3_K_L,
    Q3_K_S,
    Q2_K,
    Q2_K_S,
    IQ4_XS,
    IQ3_M,
    IQ3_S,
    IQ3_XS,
    IQ3_XXS,
    IQ2_M,
    IQ2_S,
    IQ2_XS,
    IQ2_XXS,
    IQ1_M,
    IQ1_S,
}

impl FileType {
    pub const ALL: [FileType; 30] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q6_K,
        FileType::Q5_K_M,
        FileType::Q5_K_S,
        FileType::Q4_K_M,
        FileType::Q4_K_S,
        FileType::Q3_K_M,
        FileType::Q4_0,
        FileType::IQ4_NL,
        FileType::Q5_1,
        FileType::Q5_0,
        FileType::Q4_1,
        FileType::Q3_K_L,
        FileType::Q3_K_S,
        FileType::Q2_K,
        FileType::Q2_K_S,
        FileType::IQ4_XS,
        FileType::IQ3_M,
        FileType::IQ3_S,
        FileType::IQ3_XS,
        FileType::IQ3_XXS,
        FileType::IQ2_M,
        FileType::IQ2_S,
        FileType::IQ2_XS,
        FileType::IQ2_XXS,
        FileType::IQ1_M,
        FileType::IQ1_S,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "F32",
            FileType::F16 => "F16",
            FileType::BF16 => "BF16",
            FileType::Q8_0 => "Q8_0",
            FileType::Q6_K => "Q6_K",
            FileType::Q5_K_M => "Q5_K_M",
            FileType::Q5_K_S => "Q5_K_S",
            FileType::Q4_K_M => "Q4_K_M",
            FileType::Q4_K_S => "Q4_K_S",
            FileType::Q3_K_M => "Q3_K_M",
            FileType::Q4_0 => "Q4_0",
            FileType::IQ4_NL => "IQ4_NL",
            FileType::Q5_1 => "Q5_1",
            FileType::Q5_0 => "Q5_0",
            FileType::Q4_1 => "Q4_1",
            FileType::Q3_K_L => "Q3_K_L",
            FileType::Q3_K_S => "Q3_K_S",
            FileType::Q2_K => "Q2_K",
            FileType::Q2_K_S => "Q2_K_S",
            FileType::IQ4_XS => "IQ4_XS",
            FileType::IQ3_M => "IQ3_M",
            FileType::IQ3_S => "IQ3_S",
            FileType::IQ3_XS => "IQ3_XS",
            FileType::IQ3_XXS => "IQ3_XXS",
            FileType::IQ2_M => "IQ2_M",
            FileType::IQ2_S => "IQ2_S",
            FileType::IQ2_XS => "IQ2_XS",
            FileType::IQ2_XXS => "IQ2_XXS",
            FileType::IQ1_M => "IQ1_M",
            FileType::IQ1_S => "IQ1_S",
        }
    }

    /// A file type by llama-quantize's name, or one of its aliases (`Q5_K`, `Q4_K`, `Q3_K`: the
    /// `_M` mixes).
    pub fn from_name(s: &str) -> Option<FileType> {
        let s = match s.to_ascii_uppercase().as_str() {
            "Q5_K" => "Q5_K_M".to_string(),
            "Q4_K" => "Q4_K_M".to_string(),
            "Q3_K" => "Q3_K_M".to_string(),
            _ => s.to_string(),
        };
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(&s))
    }

    /// llama.cpp's `LLAMA_FTYPE_*` value, stored as `general.file_type`.
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q8_0 => 7,
            FileType::Q3_K_M => 12,
            FileType::Q4_K_S => 14,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_S => 16,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::IQ4_NL => 25,
            FileType::BF16 => 32,
            FileType::Q4_1 => 3,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q2_K => 10,
            FileType::Q3_K_S => 11,
            FileType::Q3_K_L => 13,
            FileType::Q2_K_S => 21,
            FileType::IQ4_XS => 30,
            FileType::IQ3_M => 27,
            FileType::IQ3_S => 26,
            FileType::IQ3_XS => 22,
            FileType::IQ3_XXS => 23,
            FileType::IQ2_M => 29,
            FileType::IQ2_S => 28,
            FileType::IQ2_XS => 20,
            FileType::IQ2_XXS => 19,
            FileType::IQ1_M => 31,
            FileType::IQ1_S => 24,
        }
    }

    /// The type most 2-D tensors get.
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q6_K => GgmlType::Q6_K,
            FileType::Q5_K_M | FileType::Q5_K_S => GgmlType::Q5_K,
            FileType::Q4_K_M | FileType::Q4_K_S => GgmlType::Q4_K,
            FileType::Q3_K_M | FileType::Q3_K_S | FileType::Q3_K_L => GgmlType::Q3_K,
            FileType::Q2_K | FileType::Q2_K_S => GgmlType::Q2_K,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::IQ4_NL => GgmlType::IQ4_NL,
            FileType::IQ4_XS => GgmlType::IQ4_XS,
            FileType::IQ3_M | FileType::IQ3_S | FileType::IQ3_XS => GgmlType::IQ3_S,
            FileType::IQ3_XXS => GgmlType::IQ3_XXS,
            FileType::IQ2_M => GgmlType::IQ2_S,
            FileType::IQ2_S | FileType::IQ2_XS => GgmlType::IQ2_XS,
            FileType::IQ2_XXS => GgmlType::IQ2_XXS,
            FileType::IQ1_M => GgmlType::IQ1_M,
            FileType::IQ1_S => GgmlType::IQ1_S,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, FileType::F32 | FileType::F16 | FileType::BF16)
    }
}

/// llama.cpp's `use_more_bits`: the layers that get more bits in the _M mixes.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i >= n / 8 && (i - n / 8) % 3 == 2)
}

/// The layer index in a `blk.{i}.` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// A user override: tensors whose GGUF name matches get this type (llama-quantize's
/// `--tensor-type`), before the shape fallback.
#[derive(Debug, Clone)]
pub struct TypeOverride {
    pub pattern: regex::Regex,
    pub ty: GgmlType,
}

/// The type llama-quantize gives GGUF tensor `name` of `shape` (outermost first), without an
/// importance matrix.
pub fn tensor_type(ft: FileType, cfg: &OuroConfig, name: &str, shape: &[usize], overrides: &[TypeOverride]) -> GgmlType {
    tensor_type_with(ft, cfg, name, shape, overrides, false)
}

/// Whether llama-quantize refuses to write tensor `name` as `ty` in a file of type `ft` without
/// importance data for it (`tensor_requires_imatrix`): the IQ3_XXS, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_M
/// and IQ1_S tensors, and the Q2_K tensors of a Q2_K_S file; never the token embedding or the
/// output.
pub fn requires_imatrix(ft: FileType, name: &str, ty: GgmlType) -> bool {
    if name == "token_embd.weight" || name == "output.weight" {
        return false;
    }
    match ty {
        GgmlType::IQ3_XXS | GgmlType::IQ2_XXS | GgmlType::IQ2_XS | GgmlType::IQ2_S | GgmlType::IQ1_M | GgmlType::IQ1_S => true,
        GgmlType::Q2_K => ft == FileType::Q2_K_S,
        _ => false,
    }
}

impl FileType {
    /// The very-low-bit mixes, which llama-quantize treats as one family (embedding, output,
    /// attn_v, the first ffn_down layers and attn_output get fixed types).
    fn is_low_iq(self) -> bool {
        matches!(self, FileType::IQ2_XXS | FileType::IQ2_XS | FileType::IQ1_S | FileType::IQ2_S | FileType::IQ2_M | FileType::IQ1_M)
    }

    /// Whether llama-quantize makes this file type only with an importance matrix (some of its
    /// tensors' types [`requires_imatrix`]).
    pub fn needs_importance(self) -> bool {
        self.is_low_iq() || matches!(self, FileType::IQ3_XXS | FileType::IQ3_XS | FileType::Q2_K_S)
    }

    /// Of [`Self::is_low_iq`], those that use IQ3_S where the others use Q2_K.
    fn is_iq2_s_or_m(self) -> bool {
        matches!(self, FileType::IQ2_S | FileType::IQ2_M)
    }
}

/// [`tensor_type`] when llama-quantize has an importance matrix (`has_imatrix`): IQ4_NL keeps its
/// type in the first ffn_down layers (Q5_K without one), and Q4_0 / Q5_0 give them Q4_1 / Q5_1.
pub fn tensor_type_with(ft: FileType, cfg: &OuroConfig, name: &str, shape: &[usize], overrides: &[TypeOverride], has_imatrix: bool) -> GgmlType {
    // 1-D tensors (norms) and anything not a weight matrix are never quantized.
    if shape.len() < 2 || !name.ends_with("weight") || name.contains("_norm.weight") {
        return GgmlType::F32;
    }
    let cols = *shape.last().expect("2-D");
    let def = ft.default_type();
    if !ft.is_quantized() {
        return match overrides.iter().find(|o| o.pattern.is_match(name)) {
            Some(o) => fallback(o.ty, cols),
            None => def,
        };
    }
    if let Some(o) = overrides.iter().find(|o| o.pattern.is_match(name)) {
        return fallback(o.ty, cols);
    }
    let l = cfg.num_hidden_layers;
    let unrolled = l * cfg.total_ut_steps;
    let n_gqa = cfg.num_attention_heads / cfg.num_key_value_heads;
    let tied = cfg.tie_word_embeddings;
    let ty = if name == "output.weight" || (tied && name == "token_embd.weight") {
        if cols % def.block_size() != 0 {
            GgmlType::Q8_0
        } else if ft.is_low_iq() || ft == FileType::IQ3_XXS {
            GgmlType::Q5_K
        } else if def != GgmlType::Q8_0 {
            GgmlType::Q6_K
        } else {
            def
        }
    } else if name == "token_embd.weight" {
        match ft {
            FileType::IQ2_XXS | FileType::IQ2_XS | FileType::IQ1_S | FileType::IQ1_M => GgmlType::Q2_K,
            FileType::IQ2_S | FileType::IQ2_M | FileType::IQ3_XXS => GgmlType::IQ3_S,
            _ => def,
        }
    } else if ft.is_low_iq() {
        let low = if ft.is_iq2_s_or_m() { GgmlType::IQ3_S } else { GgmlType::Q2_K };
        if name.contains("attn_v.weight") {
            if n_gqa >= 4 {
                GgmlType::Q4_K
            } else {
                low
            }
        } else if name.contains("ffn_down") {
            // llama-quantize's own counter over the ffn_down tensors, against the unrolled count
            if layer_of(name).unwrap_or(0) < unrolled / 8 {
                low
            } else {
                def
            }
        } else if name.contains("attn_output.weight") {
            match ft {
                FileType::IQ1_S | FileType::IQ1_M => GgmlType::IQ2_XXS,
                FileType::IQ2_S | FileType::IQ2_M => GgmlType::IQ3_S,
                _ => def,
            }
        } else {
            def
        }
    } else if name.contains("attn_v.weight") {
        let i = layer_of(name).unwrap_or(0);
        match ft {
            FileType::Q2_K if n_gqa >= 4 => GgmlType::Q4_K,
            FileType::Q2_K => GgmlType::Q3_K,
            FileType::Q2_K_S if n_gqa >= 4 => GgmlType::Q4_K,
            FileType::Q3_K_M => {
                if i < 2 {
                    GgmlType::Q5_K
                } else {
                    GgmlType::Q4_K
                }
            }
            FileType::Q3_K_L => GgmlType::Q5_K,
            FileType::IQ3_XXS if n_gqa >= 4 => GgmlType::Q4_K,
            FileType::IQ3_XXS if !has_imatrix => GgmlType::IQ3_S,
            FileType::IQ3_XS | FileType::IQ3_S if n_gqa >= 4 => GgmlType::Q4_K,
            FileType::IQ3_M => GgmlType::Q4_K,
            FileType::IQ4_NL | FileType::IQ4_XS if n_gqa >= 4 => GgmlType::Q5_K,
            FileType::Q4_K_M | FileType::Q5_K_M if use_more_bits(i, l) => GgmlType::Q6_K,
            FileType::Q4_K_S if i < 4 => GgmlType::Q5_K,
            _ => def,
        }
    } else if name.contains("ffn_down") {
        let i = layer_of(name).unwrap_or(0);
        let n = unrolled;
        match ft {
            FileType::Q2_K => GgmlType::Q3_K,
            FileType::Q2_K_S if i < n / 8 => GgmlType::Q4_K,
            FileType::IQ3_XXS if !has_imatrix => {
                if i < n / 8 {
                    GgmlType::Q4_K
                } else {
                    GgmlType::Q3_K
                }
            }
            FileType::IQ3_M if i < n / 8 => GgmlType::Q4_K,
            FileType::Q3_K_L => GgmlType::Q5_K,
            FileType::Q3_K_M => {
                if i < n / 16 {
                    GgmlType::Q5_K
                } else {
                    GgmlType::Q4_K
                }
            }
            FileType::Q4_K_M if use_more_bits(i, n) => GgmlType::Q6_K,
            FileType::IQ4_NL | FileType::IQ4_XS if i < n / 8 && !has_imatrix => GgmlType::Q5_K,
            FileType::Q4_0 if i < n / 8 && has_imatrix => GgmlType::Q4_1,
            FileType::Q5_0 if i < n / 8 && has_imatrix => GgmlType::Q5_1,
            FileType::Q5_K_M if use_more_bits(i, n) => GgmlType::Q6_K,
            FileType::Q4_K_S if i < n / 8 => GgmlType::Q5_K,
            _ => def,
        }
    } else if name.contains("attn_output.weight") {
        match ft {
            FileType::Q2_K => GgmlType::Q3_K,
            FileType::IQ3_XXS => GgmlType::IQ3_S,
            FileType::Q3_K_M | FileType::IQ3_M => GgmlType::Q4_K,
            FileType::Q3_K_L => GgmlType::Q5_K,
            _ => def,
        }
    } else if name.contains("attn_k.weight") || name.contains("attn_q.weight") {
        match ft {
            FileType::IQ3_XS => GgmlType::IQ3_XXS,
            FileType::IQ3_XXS => GgmlType::IQ2_S,
            _ => def,
        }
    } else if name.contains("ffn_gate") || name.contains("ffn_up") {
        // counted over the unrolled depth, like ffn_down
        let i = layer_of(name).unwrap_or(0);
        if ft == FileType::IQ3_XS && i >= unrolled / 8 && i < 7 * unrolled / 8 {
            GgmlType::IQ3_XXS
        } else {
            def
        }
    } else {
        def
    };
    fallback(ty, cols)
}

/// llama-quantize's replacement when a row is not a whole number of blocks (and F16 when even the
/// replacement does not fit; llama-quantize refuses legacy types there, we fall back to F16).
pub fn fallback(t: GgmlType, cols: usize) -> GgmlType {
    if cols % t.block_size() == 0 {
        return t;
    }
    let alt = match t {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::IQ4_XS
        | GgmlType::IQ3_XXS
        | GgmlType::IQ3_S
        | GgmlType::IQ2_XXS
        | GgmlType::IQ2_XS
        | GgmlType::IQ2_S
        | GgmlType::IQ1_S
        | GgmlType::IQ1_M => GgmlType::IQ4_NL,
        _ => GgmlType::F16,
    };
    if cols % alt.block_size() == 0 {
        alt
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_1_4b() -> OuroConfig {
        OuroConfig::from_map(
            crate::synth::preset_config(crate::synth::Preset::Ouro1_4b, None)
                .as_object()
                .unwrap()
                .clone(),
            std::path::Path::new("config.json"),
        )
        .unwrap()
    }

    fn count(ft: FileType, suffix: &str, ty: GgmlType) -> usize {
        let cfg = cfg_1_4b();
        (0..24)
            .filter(|l| tensor_type(ft, &cfg, &format!("blk.{l}.{suffix}"), &[2048, 5632], &[]) == ty)
            .count()
    }

    #[test]
    fn q4_k_m_on_ouro_1_4b_gives_16_q6k_ffn_down() {
        let cfg = cfg_1_4b();
        assert_eq!(count(FileType::Q4_K_M, "ffn_down.weight", GgmlType::Q6_K), 16);
        assert_eq!(count(FileType::Q4_K_M, "attn_v.weight", GgmlType::Q6_K), 12);
        assert_eq!(count(FileType::Q4_K_M, "attn_q.weight", GgmlType::Q4_K), 24);
        assert_eq!(tensor_type(FileType::Q4_K_M, &cfg, "output.weight", &[49152, 2048], &[]), GgmlType::Q6_K);
        assert_eq!(tensor_type(FileType::Q4_K_M, &cfg, "token_embd.weight", &[49152, 2048], &[]), GgmlType::Q4_K);
        assert_eq!(tensor_type(FileType::Q4_K_M, &cfg, "output_norm.weight", &[2048], &[]), GgmlType::F32);
        assert_eq!(tensor_type(FileType::Q8_0, &cfg, "output.weight", &[49152, 2048], &[]), GgmlType::Q8_0);
        assert_eq!(tensor_type(FileType::Q4_0, &cfg, "output.weight", &[49152, 2048], &[]), GgmlType::Q6_K);
        assert_eq!(tensor_type(FileType::F16, &cfg, "output.weight", &[49152, 2048], &[]), GgmlType::F16);
        assert_eq!(count(FileType::Q4_K_S, "ffn_down.weight", GgmlType::Q5_K), 12);
        assert_eq!(count(FileType::Q4_K_S, "attn_v.weight", GgmlType::Q5_K), 4);
        assert_eq!(count(FileType::Q3_K_M, "ffn_down.weight", GgmlType::Q5_K), 6);
        assert_eq!(count(FileType::Q3_K_M, "attn_output.weight", GgmlType::Q4_K), 24);
        // the new mixes, by llama.cpp's rules (src/llama-quant.cpp of ggml 0.25.3's llama.cpp,
        // non-MoE, no importance matrix); Ouro-1.4B has no GQA (n_gqa = 1)
        assert_eq!(count(FileType::Q2_K, "attn_v.weight", GgmlType::Q3_K), 24);
        assert_eq!(count(FileType::Q2_K, "ffn_down.weight", GgmlType::Q3_K), 24);
        assert_eq!(count(FileType::Q2_K, "attn_output.weight", GgmlType::Q3_K), 24);
        assert_eq!(count(FileType::Q2_K, "attn_q.weight", GgmlType::Q2_K), 24);
        assert_eq!(count(FileType::Q2_K_S, "ffn_down.weight", GgmlType::Q4_K), 12);
        assert_eq!(count(FileType::Q2_K_S, "attn_v.weight", GgmlType::Q2_K), 24);
        assert_eq!(count(FileType::Q3_K_L, "attn_v.weight", GgmlType::Q5_K), 24);
        assert_eq!(count(FileType::Q3_K_L, "ffn_down.weight", GgmlType::Q5_K), 24);
        assert_eq!(count(FileType::Q3_K_L, "attn_output.weight", GgmlType::Q5_K), 24);
        assert_eq!(count(FileType::Q3_K_S, "ffn_down.weight", GgmlType::Q3_K), 24);
        assert_eq!(count(FileType::Q4_1, "ffn_down.weight", GgmlType::Q4_1), 24);
        assert_eq!(tensor_type(FileType::Q5_0, &cfg, "output.weight", &[49152, 2048], &[]), GgmlType::Q6_K);
        assert_eq!(tensor_type(FileType::Q2_K, &cfg, "token_embd.weight", &[49152, 2048], &[]), GgmlType::Q2_K);
        assert_eq!(count(FileType::IQ4_XS, "ffn_down.weight", GgmlType::Q5_K), 12);
        assert_eq!(count(FileType::IQ4_XS, "attn_q.weight", GgmlType::IQ4_XS), 24);
        assert_eq!(tensor_type(FileType::IQ4_XS, &cfg, "output.weight", &[49152, 2048], &[]), GgmlType::Q6_K);
        assert_eq!(fallback(GgmlType::IQ4_XS, 64), GgmlType::IQ4_NL);
        assert_eq!(FileType::IQ4_XS.id(), 30);
        assert_eq!(FileType::from_name("q4_k"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::from_name("Q3_K"), Some(FileType::Q3_K_M));
        assert_eq!(fallback(GgmlType::Q4_K, 64), GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q8_0, 48), GgmlType::F16);
        // with an importance matrix (llama-quantize's has_imatrix): the first n/8 ffn_down of the
        // unrolled depth (12 of 96) change type
        let with = |ft, i: usize| tensor_type_with(ft, &cfg, &format!("blk.{i}.ffn_down.weight"), &[2048, 5632], &[], true);
        assert_eq!((with(FileType::IQ4_NL, 11), with(FileType::IQ4_NL, 12)), (GgmlType::IQ4_NL, GgmlType::IQ4_NL));
        assert_eq!((with(FileType::Q4_0, 11), with(FileType::Q4_0, 12)), (GgmlType::Q4_1, GgmlType::Q4_0));
        assert_eq!((with(FileType::Q5_0, 11), with(FileType::Q5_0, 12)), (GgmlType::Q5_1, GgmlType::Q5_0));
        assert_eq!(count(FileType::Q4_0, "ffn_down.weight", GgmlType::Q4_0), 24);
        assert!(requires_imatrix(FileType::Q2_K_S, "blk.0.attn_q.weight", GgmlType::Q2_K));
        assert!(!requires_imatrix(FileType::Q2_K_S, "token_embd.weight", GgmlType::Q2_K));
        assert!(!requires_imatrix(FileType::Q2_K, "blk.0.attn_q.weight", GgmlType::Q2_K));
        let o = TypeOverride { pattern: regex::Regex::new("attn_q").unwrap(), ty: GgmlType::Q8_0 };
        assert_eq!(tensor_type(FileType::Q4_K_M, &cfg, "blk.3.attn_q.weight", &[2048, 2048], &[o]), GgmlType::Q8_0);
    }
}
