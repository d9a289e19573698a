//! MLX output: the directory layout `mlx_lm.convert` writes (HF tensor names, affine-quantized
//! `weight`/`scales`/`biases` triples, `config.json` with a `quantization` section), plus our
//! `ouro.py` model file so that stock mlx-lm runs Ouro with `trust_remote_code=True`.
//! The layout is written down in `formats/mlx.md`.

pub mod affine;
pub mod read;
pub mod write;

use serde::Serialize;

use crate::checkpoint::{expected_tensors, tensor_role, OuroConfig, TensorRole};
use crate::error::{Error, Result};
use crate::imatrix::ImatrixInput;

/// The MLX model file shipped in every output (`config.json` names it as `model_file`).
pub const OURO_PY: &str = include_str!("../../formats/mlx/ouro.py");

/// mlx-lm's shard limit (`MAX_FILE_SIZE_GB = 5`, in GiB).
pub const DEFAULT_SHARD_BYTES: u64 = 5 << 30;

/// Whether a tensor is a kind MLX quantizes: embeddings and projections are; norms and the exit
/// gate (2,049 parameters that decide compute) stay in the source dtype.
pub fn is_quantized(hf_name: &str) -> bool {
    matches!(
        tensor_role(hf_name),
        Some(TensorRole::Embedding | TensorRole::Linear { .. } | TensorRole::LmHead)
    )
}

/// mlx-lm's mixed-precision recipes: low bits everywhere, high bits for `v_proj` and `down_proj` of
/// some layers and for `lm_head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Recipe {
    #[serde(rename = "mixed_2_6")]
    Mixed2_6,
    #[serde(rename = "mixed_3_4")]
    Mixed3_4,
    #[serde(rename = "mixed_3_6")]
    Mixed3_6,
    #[serde(rename = "mixed_4_6")]
    Mixed4_6,
}

impl Recipe {
    pub const ALL: [Recipe; 4] = [Recipe::Mixed2_6, Recipe::Mixed3_4, Recipe::Mixed3_6, Recipe::Mixed4_6];

    pub fn name(self) -> &'static str {
        match self {
            Recipe::Mixed2_6 => "mixed_2_6",
            Recipe::Mixed3_4 => "mixed_3_4",
            Recipe::Mixed3_6 => "mixed_3_6",
            Recipe::Mixed4_6 => "mixed_4_6",
        }
    }

    pub fn from_name(s: &str) -> Option<Recipe> {
        Recipe::ALL.into_iter().find(|r| r.name() == s)
    }

    /// (low bits, high bits).
    pub fn bits(self) -> (u32, u32) {
        match self {
            Recipe::Mixed2_6 => (2, 6),
            Recipe::Mixed3_4 => (3, 4),
            Recipe::Mixed3_6 => (3, 6),
            Recipe::Mixed4_6 => (4, 6),
        }
    }

    /// Bits for a module path (HF name without `.weight`), with `layers` physical layers: mlx-lm's
    /// rule `i < L/8 or i >= 7L/8 or (i - L/8) % 3 == 2` (integer division, Python's modulo).
    pub fn bits_for(self, module: &str, layers: usize) -> u32 {
        let (low, high) = self.bits();
        let index = module
            .split('.')
            .nth(2)
            .filter(|_| module.starts_with("model.layers."))
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(0);
        let l8 = (layers / 8) as i64;
        let more = index < l8 || index >= (7 * layers / 8) as i64 || (index - l8).rem_euclid(3) == 2;
        if (module.contains("v_proj") || module.contains("down_proj")) && more {
            return high;
        }
        if module.contains("lm_head") {
            return high;
        }
        low
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct MlxOptions {
    /// Bits of the quantized tensors; `None` keeps every tensor in the source dtype.
    pub bits: Option<u32>,
    pub group_size: usize,
    pub recipe: Option<Recipe>,
    pub force: bool,
    /// Largest shard (mlx-lm: 5 GiB); a tensor bigger than this gets a shard of its own.
    pub shard_bytes: u64,
    /// Importance data (`--imatrix`): each group's scale and bias minimise the importance-weighted
    /// error (`affine::quantize_row_weighted`) for the weights it has an entry for.
    pub imatrix: Option<ImatrixInput>,
}

impl MlxOptions {
    /// Checks the combination and returns it.
    pub fn new(bits: Option<u32>, group_size: usize, recipe: Option<Recipe>, force: bool) -> Result<Self> {
        if let Some(b) = bits {
            if !affine::BITS.contains(&b) {
                return Err(Error::Usage(format!("--bits {b}: MLX affine quantization supports 2, 3, 4, 5, 6 and 8 bits (16 keeps the weights unquantized)")));
            }
        }
        if !affine::GROUP_SIZES.contains(&group_size) {
            return Err(Error::Usage(format!("--group-size {group_size}: MLX supports 32, 64 and 128")));
        }
        if recipe.is_some() && bits.is_none() {
            return Err(Error::Usage("--recipe needs quantization; it cannot be combined with --bits 16".into()));
        }
        Ok(MlxOptions {
            bits: recipe.map(|r| r.bits().0).or(bits),
            group_size,
            recipe,
            force,
            shard_bytes: DEFAULT_SHARD_BYTES,
            imatrix: None,
        })
    }

    /// The name suffix mlx-community uses: `4bit`, `8bit`, `4bit-gs32`, `mixed_4_6`, `bf16`.
    pub fn suffix(&self, source_dtype: &str) -> String {
        match (self.recipe, self.bits) {
            (Some(r), _) if self.group_size == 64 => r.name().to_string(),
            (Some(r), _) => format!("{}-gs{}", r.name(), self.group_size),
            (None, Some(b)) if self.group_size == 64 => format!("{b}bit"),
            (None, Some(b)) => format!("{b}bit-gs{}", self.group_size),
            (None, None) => source_dtype.to_lowercase(),
        }
    }

    /// `(bits, group_size)` for a module, or `None` to keep it in float.
    pub fn quant_for(&self, module: &str, cols: usize, layers: usize) -> Option<(u32, usize)> {
        let bits = self.bits?;
        if !is_quantized(&format!("{module}.weight")) || cols % self.group_size != 0 {
            return None;
        }
        let b = self.recipe.map(|r| r.bits_for(module, layers)).unwrap_or(bits);
        Some((b, self.group_size))
    }
}

/// Bytes of all tensors of an MLX output with `bits` and `group_size`, scales and biases stored in
/// a dtype of `float_bytes` bytes (2 for bf16), unquantized tensors likewise.
pub fn output_bytes(cfg: &OuroConfig, bits: usize, group_size: usize, float_bytes: usize) -> u64 {
    expected_tensors(cfg)
        .iter()
        .map(|t| {
            let numel: usize = t.shape.iter().product();
            if is_quantized(&t.name) && t.shape[1] % group_size == 0 {
                let rows = t.shape[0];
                let cols = t.shape[1];
                (rows * cols * bits / 8 + 2 * rows * (cols / group_size) * float_bytes) as u64
            } else {
                (numel * float_bytes) as u64
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_recipe_layers_follow_mlx_lm() {
        // 24 layers: L/8 = 3, 7L/8 = 21; high bits at 0,1,2, 5,8,...,20 ((i-3)%3==2), 21,22,23.
        let r = Recipe::Mixed4_6;
        let high: Vec<usize> = (0..24)
            .filter(|&i| r.bits_for(&format!("model.layers.{i}.mlp.down_proj"), 24) == 6)
            .collect();
        assert_eq!(high, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
        assert_eq!(r.bits_for("model.layers.5.self_attn.q_proj", 24), 4);
        assert_eq!(r.bits_for("lm_head", 24), 6);
        assert_eq!(r.bits_for("model.embed_tokens", 24), 4);
        // 3 layers: L/8 = 0, 7L/8 = 2; (i - 0) % 3 == 2 -> 2 anyway.
        let high: Vec<usize> = (0..3)
            .filter(|&i| Recipe::Mixed3_6.bits_for(&format!("model.layers.{i}.self_attn.v_proj"), 3) == 6)
            .collect();
        assert_eq!(high, vec![2]);
    }

    #[test]
    fn names_like_mlx_community() {
        let o = |b, g, r| MlxOptions::new(b, g, r, false).unwrap().suffix("BF16");
        assert_eq!(o(Some(4), 64, None), "4bit");
        assert_eq!(o(Some(8), 64, None), "8bit");
        assert_eq!(o(Some(4), 32, None), "4bit-gs32");
        assert_eq!(o(Some(4), 64, Some(Recipe::Mixed4_6)), "mixed_4_6");
        assert_eq!(o(None, 64, None), "bf16");
        assert!(MlxOptions::new(Some(7), 64, None, false).is_err());
        assert!(MlxOptions::new(Some(4), 48, None, false).is_err());
    }
}
