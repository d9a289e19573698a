//! The `ouro` architecture in GGUF, as llama.cpp's community port loads it: tensor names, the
//! Q/K row permutation, and the metadata keys. One table serves the writer, the reader (our runner)
//! and `formats/gguf-ouro.md` (a test checks the document lists every row).

use crate::checkpoint::OuroConfig;

use super::file::Value;

pub const ARCH: &str = "ouro";

/// Per-layer tensors: (HF suffix after `model.layers.{i}.`, GGUF suffix after `blk.{i}.`), in the
/// order the writer emits them.
pub const LAYER_TENSORS: [(&str, &str); 11] = [
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("input_layernorm_2.weight", "post_attention_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("post_attention_layernorm_2.weight", "post_ffw_norm.weight"),
];

/// Tensors outside the layers: (HF name, GGUF name), emitted before the layers.
pub const GLOBAL_TENSORS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.norm.weight", "output_norm.weight"),
];

/// Metadata keys for the exit gate, which is not a tensor (llama.cpp rejects unexpected tensors).
pub const KEY_GATE_WEIGHT: &str = "ouro.exit_gate.weight";
pub const KEY_GATE_BIAS: &str = "ouro.exit_gate.bias";
pub const KEY_EXIT_THRESHOLD: &str = "ouro.early_exit_threshold";

/// How a tensor's rows are reordered on the way into GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOrder {
    AsIs,
    /// llama.cpp's Llama conversion: within each of `heads` heads, rows go from "first half /
    /// second half" to interleaved pairs, because its rope rotates adjacent pairs.
    RopePermute { heads: usize },
}

impl RowOrder {
    /// The source (HF) row that lands at GGUF row `r` of a tensor with `rows` rows.
    pub fn source_row(self, r: usize, rows: usize) -> usize {
        match self {
            RowOrder::AsIs => r,
            RowOrder::RopePermute { heads } => {
                let hd = rows / heads;
                let (h, k) = (r / hd, r % hd);
                let (i, j) = (k / 2, k % 2);
                h * hd + j * (hd / 2) + i
            }
        }
    }
    /// The GGUF row that holds HF row `s` (the inverse of [`RowOrder::source_row`]).
    pub fn target_row(self, s: usize, rows: usize) -> usize {
        match self {
            RowOrder::AsIs => s,
            RowOrder::RopePermute { heads } => {
                let hd = rows / heads;
                let (h, k) = (s / hd, s % hd);
                let (j, i) = (k / (hd / 2), k % (hd / 2));
                h * hd + 2 * i + j
            }
        }
    }
}

/// One tensor of the GGUF file with where it comes from.
#[derive(Debug, Clone)]
pub struct MappedTensor {
    pub hf_name: String,
    pub gguf_name: String,
    pub row_order: RowOrder,
}

/// Every GGUF tensor of a model with this config, in file order.
pub fn tensor_map(cfg: &OuroConfig) -> Vec<MappedTensor> {
    let mut out = vec![];
    for (hf, gg) in GLOBAL_TENSORS {
        if hf == "lm_head.weight" && cfg.tie_word_embeddings {
            continue;
        }
        out.push(MappedTensor {
            hf_name: hf.into(),
            gguf_name: gg.into(),
            row_order: RowOrder::AsIs,
        });
    }
    for l in 0..cfg.num_hidden_layers {
        for (hf, gg) in LAYER_TENSORS {
            let row_order = match gg {
                "attn_q.weight" => RowOrder::RopePermute { heads: cfg.num_attention_heads },
                "attn_k.weight" => RowOrder::RopePermute { heads: cfg.num_key_value_heads },
                _ => RowOrder::AsIs,
            };
            out.push(MappedTensor {
                hf_name: format!("model.layers.{l}.{hf}"),
                gguf_name: format!("blk.{l}.{gg}"),
                row_order,
            });
        }
    }
    out
}

/// The GGUF name of an HF tensor name, if it has one.
pub fn gguf_name(cfg: &OuroConfig, hf_name: &str) -> Option<String> {
    tensor_map(cfg).into_iter().find(|m| m.hf_name == hf_name).map(|m| m.gguf_name)
}

/// The architecture keys (types exactly as llama.cpp checks them: counts UINT32, eps and rope base
/// FLOAT32, loops UINT32, the final-norm flag BOOL) and the exit gate.
pub fn arch_metadata(cfg: &OuroConfig, gate_weight: &[f32], gate_bias: f32) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{ARCH}.{s}");
    let u = |x: usize| Value::U32(x as u32);
    let mut kv = vec![
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("block_count"), u(cfg.num_hidden_layers)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_attention_heads)),
        (k("attention.head_count_kv"), u(cfg.num_key_value_heads)),
        (k("attention.key_length"), u(cfg.head_dim)),
        (k("attention.value_length"), u(cfg.head_dim)),
        (k("rope.dimension_count"), u(cfg.head_dim)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (k("num_loops"), u(cfg.total_ut_steps)),
        (k("skip_loop_final_norm"), Value::Bool(false)),
        (KEY_GATE_WEIGHT.into(), Value::f32s(gate_weight.iter().copied())),
        (KEY_GATE_BIAS.into(), Value::F32(gate_bias)),
    ];
    if let Some(q) = cfg.early_exit_threshold {
        kv.push((KEY_EXIT_THRESHOLD.into(), Value::F32(q as f32)));
    }
    kv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permutation_matches_llama_cpp_and_inverts() {
        // llama.cpp: reshape(heads, 2, hd/2, ...).swapaxes(1, 2): GGUF row h*hd + 2i + j holds HF
        // row h*hd + j*hd/2 + i. With 2 heads of 4: [0, 2, 1, 3, 4, 6, 5, 7].
        let p = RowOrder::RopePermute { heads: 2 };
        let src: Vec<usize> = (0..8).map(|r| p.source_row(r, 8)).collect();
        assert_eq!(src, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        for s in 0..64 {
            let q = RowOrder::RopePermute { heads: 4 };
            assert_eq!(q.source_row(q.target_row(s, 64), 64), s);
        }
    }
}
