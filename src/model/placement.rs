//! Where each weight lives and what it costs there: the rule the loader ([`super::source`])
//! follows, stated once, so that the planners (`plan`, `run --max-memory`) count what a load
//! will hold before anything is loaded.
//!
//! | stored as | on the CPU | on a GPU (CUDA, Metal) |
//! |---|---|---|
//! | GGUF Q4_0, Q8_0, Q2_K..Q6_K (candle's types) | the blocks | the blocks (CUDA adds candle's row padding, 512 values per tensor) |
//! | GGUF Q4_1, Q5_0, Q5_1 with an odd number of blocks per row | dense f32 | dense f32 |
//! | GGUF IQ4_NL | the blocks (dense f32 on CPUs without our kernels) | the same values as Q8_0 blocks (exact: int8 table entries) |
//! | GGUF IQ4_XS | the blocks (dense f32 on CPUs without our kernels) | dense f32 (no GPU kernel) |
//! | GGUF lattice i-quants (IQ3_*, IQ2_*, IQ1_*) | the blocks | dense f32 (no GPU kernel) |
//! | GGUF F16, BF16 | stored width | dense f32 |
//! | float matrices (HF checkpoints, unquantized MLX) | stored width | dense f32 |
//! | MLX affine | codes, scales and biases | dense f32 (`scale * q + bias`) |
//! | vectors (norms, exit gate) | f32 | f32 |
//! | GGUF token embedding | host memory, as stored | host memory, as stored (rows widened as looked up) |
//! | HF or MLX token embedding | as a matrix on the CPU | dense f32 on the device |
//!
//! "Dense f32" is 4 bytes per weight whatever the stored width: activations are f32 and candle
//! multiplies a float weight in the activations' dtype.

use candle_core::Device;

use crate::checkpoint::OuroConfig;
use crate::quant::ggml::GgmlType;

/// Values of padding candle's CUDA backend allocates after each quantized tensor
/// (`MATRIX_ROW_PADDING` in candle-core's `quantized/cuda.rs`).
pub const CUDA_ROW_PADDING: usize = 512;

/// What kind of memory the model is loaded into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Cpu,
    /// A discrete GPU: weights on it count against its memory, host-side ones do not.
    Cuda,
    /// Apple silicon: the GPU shares the machine's memory, so host-side weights count too.
    Metal,
}

impl Target {
    /// The target a candle device loads into.
    pub fn of(device: &Device) -> Target {
        match device {
            Device::Cpu => Target::Cpu,
            Device::Cuda(_) => Target::Cuda,
            Device::Metal(_) => Target::Metal,
        }
    }

    pub fn is_cpu(self) -> bool {
        self == Target::Cpu
    }

    /// Whether host memory and the device's memory are one budget.
    pub fn unified(self) -> bool {
        self != Target::Cuda
    }
}

/// How a matrix is stored in the model's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Floats of this many bytes (2: F16/BF16, 4: F32).
    Float { width: usize },
    /// GGML blocks of a GGUF file.
    Ggml(GgmlType),
    /// MLX affine codes of `bits`, one scale and bias of `scale_width` bytes per `group` values;
    /// `scale_width: None` where scales and biases differ in dtype (the loader widens those).
    Affine { bits: u32, group: usize, scale_width: Option<usize> },
}

/// How a matrix is held once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Held {
    /// As stored: blocks, codes or floats of the stored width.
    AsStored,
    /// Widened to dense f32.
    DenseF32,
    /// IQ4_NL on a GPU: rewritten as Q8_0 blocks of exactly the same values
    /// (`crate::quant::iq4nl::iq4_nl_as_q8_0`), which candle's GPU kernels multiply.
    Q8_0,
}

/// Bytes of memory held: on the target device, and in host memory beside it (the same memory on
/// the CPU and on unified-memory GPUs; see [`Target::unified`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Bytes {
    pub device: u64,
    pub host: u64,
}

impl Bytes {
    pub fn add(self, o: Bytes) -> Bytes {
        Bytes { device: self.device + o.device, host: self.host + o.host }
    }

    /// What counts against the target's memory.
    pub fn counted(self, t: Target) -> u64 {
        if t.unified() {
            self.device + self.host
        } else {
            self.device
        }
    }
}

/// Whether candle multiplies this GGML type on every device (its `GgmlDType`s).
fn candle_blocks(t: GgmlType) -> bool {
    use GgmlType::*;
    matches!(t, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K)
}

/// How a `[rows, cols]` projection stored as `s` is held on `t`.
pub fn held(s: Stored, cols: usize, t: Target) -> Held {
    match s {
        // candle's Q4_1/Q5_0/Q5_1 dot products assume an even number of blocks per row
        Stored::Ggml(g @ (GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1)) if (cols / g.block_size()) % 2 == 1 => Held::DenseF32,
        _ if t.is_cpu() => match s {
            Stored::Affine { scale_width: None, .. } => Held::DenseF32,
            // candle cannot hold these: our kernels multiply the blocks where this CPU has a build
            Stored::Ggml(g @ (GgmlType::IQ4_NL | GgmlType::IQ4_XS)) if !super::qkernel::holds_own(g, cols) => Held::DenseF32,
            _ => Held::AsStored,
        },
        Stored::Ggml(g) if candle_blocks(g) => Held::AsStored,
        Stored::Ggml(GgmlType::IQ4_NL) => Held::Q8_0,
        Stored::Ggml(GgmlType::F32) | Stored::Float { width: 4 } => Held::AsStored,
        _ => Held::DenseF32,
    }
}

/// Bytes of `rows * cols` values stored as `s`, at the stored width.
pub fn stored_bytes(s: Stored, rows: usize, cols: usize) -> u64 {
    (match s {
        Stored::Float { width } => rows * cols * width,
        Stored::Ggml(g) => rows * g.row_bytes(cols),
        Stored::Affine { bits, group, scale_width } => {
            rows * cols * bits as usize / 8 + 2 * rows * (cols / group) * scale_width.unwrap_or(4)
        }
    }) as u64
}

/// Device bytes of a `[rows, cols]` projection stored as `s`, loaded onto `t`.
pub fn matrix(s: Stored, rows: usize, cols: usize, t: Target) -> u64 {
    match held(s, cols, t) {
        Held::DenseF32 => (rows * cols * 4) as u64,
        Held::Q8_0 => matrix(Stored::Ggml(GgmlType::Q8_0), rows, cols, t),
        Held::AsStored => {
            let padding = match (s, t) {
                (Stored::Ggml(g), Target::Cuda) if candle_blocks(g) => CUDA_ROW_PADDING / g.block_size() * g.block_bytes(),
                _ => 0,
            };
            stored_bytes(s, rows, cols) + padding as u64
        }
    }
}

/// The token embedding `[rows, cols]` stored as `s`: GGUF's stays in host memory as stored
/// (rows are widened as tokens are looked up), HF's and MLX's are a matrix on the CPU and dense
/// f32 on a GPU.
pub fn embedding(s: Stored, rows: usize, cols: usize, t: Target) -> Bytes {
    match s {
        Stored::Ggml(_) => Bytes { device: 0, host: stored_bytes(s, rows, cols) },
        _ if t.is_cpu() => Bytes { device: matrix(s, rows, cols, t), host: 0 },
        _ => Bytes { device: (rows * cols * 4) as u64, host: 0 },
    }
}

/// Bytes of a vector of `n` values (norm gains, the exit gate): f32 everywhere.
pub fn vector(n: usize) -> u64 {
    n as u64 * 4
}

/// Bytes of the weights a model of `cfg` holds on `t`, given how each tensor is stored
/// (`stored(hf_name)` -> storage, rows, columns): what the loader takes, counted without loading.
/// A tied lm_head is the embedding loaded a second time, as a projection.
pub fn model_bytes(
    cfg: &OuroConfig,
    t: Target,
    stored: &dyn Fn(&str) -> anyhow::Result<(Stored, usize, usize)>,
) -> anyhow::Result<Bytes> {
    let mut device = 0u64;
    let mut add = |name: &str| -> anyhow::Result<()> {
        let (s, rows, cols) = stored(name)?;
        device += matrix(s, rows, cols, t);
        Ok(())
    };
    for i in 0..cfg.num_hidden_layers {
        for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
            add(&format!("model.layers.{i}.{m}.weight"))?;
        }
    }
    add(if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" })?;
    let (s, rows, cols) = stored("model.embed_tokens.weight")?;
    // four norms per layer, the final norm, the exit gate's weight and bias
    let vectors = vector((4 * cfg.num_hidden_layers + 2) * cfg.hidden_size + 1);
    Ok(embedding(s, rows, cols, t).add(Bytes { device: device + vectors, host: 0 }))
}

/// Scratch of one forward pass over `n` tokens, in f32: every loop's hidden state and a layer's
/// activations (q, k, v, attention output, residuals; the MLP's gate, up and their product),
/// the attention scores (`heads x n x n`) and a row of logits per token (perplexity scores every
/// row). An estimate from the shapes, not a measurement.
pub fn scratch_bytes(cfg: &OuroConfig, n: usize) -> u64 {
    let per_token = (cfg.total_ut_steps + 8) * cfg.hidden_size + 3 * cfg.intermediate_size + cfg.vocab_size + cfg.num_attention_heads * n;
    4 * (n as u64) * per_token as u64
}

/// What a CUDA process holds on the GPU before any tensor: the context, cuBLAS's handle and
/// workspace, and candle's kernel modules once JIT-compiled. An estimate (a CUDA context alone
/// takes 300-500 MiB on recent NVIDIA GPUs); `scripts/device-check.sh` measures it on a lent GPU.
pub const CUDA_RUNTIME_BYTES: u64 = 512 << 20;

/// Bytes the runtime holds on `t` besides weights, KV cache and scratch.
pub fn runtime_bytes(t: Target) -> u64 {
    match t {
        Target::Cuda => CUDA_RUNTIME_BYTES,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_widens_what_it_has_no_kernel_for() {
        let q4k = Stored::Ggml(GgmlType::Q4_K);
        // 2048 x 2048 Q4_K: 144 bytes per 256 values; CUDA pads 512 values (2 blocks)
        assert_eq!(matrix(q4k, 2048, 2048, Target::Cpu), 2048 * 8 * 144);
        assert_eq!(matrix(q4k, 2048, 2048, Target::Metal), 2048 * 8 * 144);
        assert_eq!(matrix(q4k, 2048, 2048, Target::Cuda), 2048 * 8 * 144 + 2 * 144);
        // IQ4_NL as Q8_0: 34 bytes per 32 values, and Q8_0's padding on CUDA (16 blocks)
        assert_eq!(matrix(Stored::Ggml(GgmlType::IQ4_NL), 64, 2048, Target::Cuda), 64 * 64 * 34 + 16 * 34);
        assert_eq!(matrix(Stored::Ggml(GgmlType::IQ4_NL), 64, 2048, Target::Metal), 64 * 64 * 34);
        let ours = crate::model::qkernel::selected().is_some();
        for g in [GgmlType::IQ4_XS, GgmlType::IQ3_S, GgmlType::IQ2_XXS, GgmlType::IQ1_M, GgmlType::F16, GgmlType::BF16] {
            let on_cpu = if g == GgmlType::IQ4_XS && !ours { Held::DenseF32 } else { Held::AsStored };
            assert_eq!(held(Stored::Ggml(g), 2048, Target::Cpu), on_cpu, "{g}");
            assert_eq!(matrix(Stored::Ggml(g), 64, 2048, Target::Cuda), 64 * 2048 * 4, "{g}");
        }
        let mlx4 = Stored::Affine { bits: 4, group: 64, scale_width: Some(2) };
        assert_eq!(matrix(mlx4, 10, 128, Target::Cpu), 10 * 64 + 2 * 10 * 2 * 2);
        assert_eq!(matrix(mlx4, 10, 128, Target::Metal), 10 * 128 * 4);
        assert_eq!(matrix(Stored::Float { width: 2 }, 3, 5, Target::Cpu), 30);
        assert_eq!(matrix(Stored::Float { width: 2 }, 3, 5, Target::Cuda), 60);
    }

    #[test]
    fn odd_block_rows_of_the_legacy_types_are_dense_everywhere() {
        for t in [Target::Cpu, Target::Cuda] {
            // 96 columns: 3 blocks of 32 per row
            assert_eq!(matrix(Stored::Ggml(GgmlType::Q5_0), 4, 96, t), 4 * 96 * 4);
            assert_eq!(held(Stored::Ggml(GgmlType::Q5_0), 128, t), Held::AsStored);
        }
    }

    #[test]
    fn embeddings_of_gguf_stay_on_the_host() {
        let e = embedding(Stored::Ggml(GgmlType::Q6_K), 100, 256, Target::Cuda);
        assert_eq!(e, Bytes { device: 0, host: 100 * 210 });
        assert_eq!(e.counted(Target::Cuda), 0);
        assert_eq!(e.counted(Target::Metal), 100 * 210);
        let e = embedding(Stored::Float { width: 2 }, 100, 256, Target::Cuda);
        assert_eq!(e, Bytes { device: 100 * 256 * 4, host: 0 });
    }
}
