//! The Ouro forward pass (spec section 3) on candle-core, one code path for every weight source.
//!
//! ```text
//! h = embed[tokens]
//! for t in 0..T:                       # loops
//!     for i in 0..L:                   # physical layers, shared by every loop
//!         h = h + N_in2_i( Attn_i( N_in_i(h), kv_slot = t*L + i ) )
//!         h = h + N_post2_i( MLP_i( N_post_i(h) ) )
//!     h = N_final(h); state[t] = h; gate[t] = early_exit_gate(h)
//! ```
//!
//! Activations are f32. Weights come from a [`source::WeightSource`] as [`Linear`] projections:
//! float weights in their stored width (HF checkpoints, F16/BF16 GGUF tensors, unquantized MLX;
//! [`linear`]), GGUF blocks ([`qkernel`], or candle's quantized tensors), MLX affine codes
//! ([`affine`]) on the CPU, or dense f32 tensors (float and MLX weights on GPUs).

pub mod affine;
pub mod attend;
pub mod exit;
pub mod dump;
pub mod generate;
pub mod qkernel;
pub mod linear;
pub mod pages;
pub mod placement;
pub mod source;

use candle_core::{DType, Device, Tensor};

pub use linear::Linear;

use crate::checkpoint::OuroConfig;
use source::WeightSource;

/// Deterministic test values in [-2, 2) (a 64-bit LCG), shared by the model's unit tests.
#[cfg(test)]
pub(crate) fn test_values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

/// Errors of the model are candle's, with context added by callers.
pub type CResult<T> = candle_core::Result<T>;

/// The most loops per token [`OuroModel::set_loops`] runs (4x the released models' 4).
pub const MAX_LOOPS: usize = 16;

/// How the KV cache keeps keys and values across loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KvPolicy {
    /// One cache per (loop, layer), as upstream: `T * L` slots.
    Full,
    /// One cache per layer holding each token's last computed loop: `L` slots (4x smaller).
    SharedLast,
}

/// One decoder layer's weights.
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    n_in: Tensor,
    n_in2: Tensor,
    n_post: Tensor,
    n_post2: Tensor,
}

/// The shapes the forward pass needs.
#[derive(Debug, Clone)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub loops: usize,
    pub vocab: usize,
    pub eps: f64,
}

impl Dims {
    /// The shapes a config implies.
    pub fn from_config(cfg: &OuroConfig) -> Self {
        Dims {
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            layers: cfg.num_hidden_layers,
            loops: cfg.total_ut_steps,
            vocab: cfg.vocab_size,
            eps: cfg.rms_norm_eps,
        }
    }
}

/// The block format of a quantized embedding's rows.
pub enum RowFormat {
    /// A type candle reads.
    Candle(candle_core::quantized::GgmlDType),
    /// A type candle has not (the IQ types), widened by our dequantizer.
    Ours(crate::quant::Dequantize),
}

/// The token embedding: dense, or quantized rows dequantized as tokens are looked up (so a
/// quantized file's embedding stays at its quantized size in memory).
pub enum Embedding {
    Dense(Tensor),
    /// Float rows in their stored width (CPU), widened as tokens are looked up.
    Float(linear::FloatMatrix),
    Quantized {
        format: RowFormat,
        bytes: Vec<u8>,
        row_bytes: usize,
        hidden: usize,
    },
    /// MLX affine-quantized rows (CPU), widened as tokens are looked up.
    Affine(affine::AffineMatrix),
}

impl Embedding {
    fn lookup(&self, tokens: &[u32], device: &Device) -> CResult<Tensor> {
        match self {
            Embedding::Dense(t) => t.index_select(&Tensor::new(tokens, device)?, 0),
            Embedding::Float(m) => Self::rows(tokens, m.rows, m.cols, |r| m.row_f32(r), device),
            Embedding::Affine(m) => Self::rows(tokens, m.rows, m.cols, |r| {
                let mut v = Vec::with_capacity(m.cols);
                m.widen_row(r, &mut v);
                v
            }, device),
            Embedding::Quantized { format, bytes, row_bytes, hidden } => {
                let vocab = bytes.len() / row_bytes;
                let rows = tokens
                    .iter()
                    .map(|&t| {
                        let r = t as usize;
                        if r >= vocab {
                            candle_core::bail!("token id {t} is outside the vocabulary ({vocab})");
                        }
                        let raw = &bytes[r * row_bytes..(r + 1) * row_bytes];
                        match format {
                            RowFormat::Candle(dtype) => candle_core::quantized::ggml_file::qtensor_from_ggml(*dtype, raw, vec![1, *hidden], device)?
                                .dequantize(device),
                            RowFormat::Ours(dequantize) => {
                                let mut v = Vec::with_capacity(*hidden);
                                dequantize(raw, &mut v);
                                Tensor::from_vec(v, (1, *hidden), device)
                            }
                        }
                    })
                    .collect::<CResult<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            }
        }
    }

    /// The rows `row(t)` of the tokens, `[n, cols]`.
    fn rows(tokens: &[u32], rows: usize, cols: usize, row: impl Fn(usize) -> Vec<f32>, device: &Device) -> CResult<Tensor> {
        let mut v = Vec::with_capacity(tokens.len() * cols);
        for &t in tokens {
            if t as usize >= rows {
                candle_core::bail!("token id {t} is outside the vocabulary ({rows})");
            }
            v.extend(row(t as usize));
        }
        Tensor::from_vec(v, (tokens.len(), cols), device)
    }

    fn bytes(&self) -> u64 {
        match self {
            Embedding::Dense(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            Embedding::Float(m) => m.bytes(),
            Embedding::Affine(m) => m.bytes(),
            Embedding::Quantized { bytes, .. } => bytes.len() as u64,
        }
    }
}

/// An Ouro model ready to run.
pub struct OuroModel {
    pub dims: Dims,
    pub config: OuroConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    gate_w: Tensor,
    gate_b: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    device: Device,
    /// Bytes of the weights as held in memory.
    pub weight_bytes: u64,
    /// Bytes of the projections of all layers (read once per loop when decoding a token).
    pub layer_bytes: u64,
    /// Bytes of the lm_head (read once per decoded token).
    pub lm_head_bytes: u64,
}

impl OuroModel {
    /// How many projections each kernel multiplies ([`Linear::kernel`]).
    pub fn kernels(&self) -> std::collections::BTreeMap<String, usize> {
        let mut k = std::collections::BTreeMap::new();
        let linears = self
            .layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .chain([&self.lm_head]);
        for l in linears {
            *k.entry(l.kernel().to_string()).or_insert(0) += 1;
        }
        k
    }
}

/// What the full cache holds for a (loop, layer) slot that a token skipped by exiting early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SkipFill {
    /// The K/V of the token's exit loop, copied forward into every deeper loop.
    Copy,
    /// Nothing: later tokens' attention in that loop does not see the token.
    Mask,
    /// Nothing until a later token runs that loop: then the token's skipped loops are run first
    /// (its state at exit is kept), so every token reads out exactly what the full pass gives at
    /// its exit loop, and a loop no later token reaches is never run. The loops run late are
    /// counted ([`KvCache::caught_up_loops`]).
    Compute,
}

/// A token that exited early under [`SkipFill::Compute`]: its position, the loops it has run and
/// its state after the last of them (the next loop's input).
#[derive(Clone)]
struct Deferred {
    pos: usize,
    loops_done: usize,
    h: Tensor,
}

/// One slot's keys and values: buffers `[kv_heads, capacity, head_dim]` written in place, of which
/// the first `len` positions are held. Appending a token writes only that token (no copy of the
/// past, which `Tensor::cat` made for every token: quadratic over a long generation); a full
/// buffer is reallocated at twice the size.
#[derive(Clone)]
struct KvSlot {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Keys and values of earlier tokens.
pub struct KvCache {
    policy: KvPolicy,
    fill: SkipFill,
    /// How keys and values are stored (F32, or F16 for half the memory); attention widens them.
    dtype: DType,
    /// Full: slot `t*L + i`; SharedLast: slot `i`.
    slots: Vec<Option<KvSlot>>,
    /// Tokens a slot's buffers are first made for.
    reserve: usize,
    /// Per slot, the positions whose entry is masked (`SkipFill::Mask`, and `Compute` until the
    /// entry is computed); empty if none is.
    masked: Vec<Vec<bool>>,
    /// `SkipFill::Compute`: the tokens whose deeper loops have not run yet, by position.
    deferred: Vec<Deferred>,
    /// `SkipFill::Compute`: loops run for earlier tokens when a later one needed them.
    caught_up: usize,
    /// Tokens held.
    pub len: usize,
}

impl KvCache {
    pub fn new(dims: &Dims, policy: KvPolicy) -> Self {
        let n = match policy {
            KvPolicy::Full => dims.loops * dims.layers,
            KvPolicy::SharedLast => dims.layers,
        };
        KvCache {
            policy,
            fill: SkipFill::Compute,
            dtype: DType::F32,
            slots: vec![None; n],
            reserve: 64,
            masked: vec![vec![]; n],
            deferred: vec![],
            caught_up: 0,
            len: 0,
        }
    }

    /// Under [`SkipFill::Compute`]: the loops run for earlier tokens because a later token needed
    /// their keys and values (0 under the other fills).
    pub fn caught_up_loops(&self) -> usize {
        self.caught_up
    }

    /// Sets what skipped slots of the full cache hold (default: [`SkipFill::Compute`], as `run`'s).
    pub fn with_skip_fill(mut self, fill: SkipFill) -> Self {
        self.fill = fill;
        self
    }

    /// Makes each slot's buffers for `tokens` tokens at once (a generation knows its context).
    pub fn with_capacity(mut self, tokens: usize) -> Self {
        self.reserve = tokens.max(1);
        self
    }

    /// Stores keys and values as `dtype` (F32 or F16; default F32).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn policy(&self) -> KvPolicy {
        self.policy
    }

    /// Bytes held by keys and values (the positions in use).
    pub fn bytes(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .map(|s| {
                let (h, _, d) = s.k.dims3().expect("3-D buffer");
                (2 * h * s.len * d * s.k.dtype().size_in_bytes()) as u64
            })
            .sum()
    }

    /// The held keys and values of a slot, `[kv_heads, len, head_dim]` views of its buffers.
    fn get(&self, slot: usize) -> CResult<Option<(Tensor, Tensor)>> {
        match &self.slots[slot] {
            None => Ok(None),
            Some(s) => Ok(Some((s.k.narrow(1, 0, s.len)?, s.v.narrow(1, 0, s.len)?))),
        }
    }

    /// Replaces the last `n` positions of a slot (the current tokens') with `k`, `v` `[kv_heads, n,
    /// head_dim]`.
    fn overwrite_last(&mut self, slot: usize, k: &Tensor, v: &Tensor) -> CResult<()> {
        let (k, v) = (k.to_dtype(self.dtype)?.contiguous()?, v.to_dtype(self.dtype)?.contiguous()?);
        let n = k.dim(1)?;
        let s = self.slots[slot].as_ref().expect("written in the first loop");
        s.k.slice_set(&k, 1, s.len - n)?;
        s.v.slice_set(&v, 1, s.len - n)?;
        Ok(())
    }

    /// Writes the keys and values `[kv_heads, 1, head_dim]` of the held position `pos` (a deferred
    /// token's, computed late) and unmasks it.
    fn write_at(&mut self, slot: usize, pos: usize, k: &Tensor, v: &Tensor) -> CResult<()> {
        let (k, v) = (k.to_dtype(self.dtype)?.contiguous()?, v.to_dtype(self.dtype)?.contiguous()?);
        let s = self.slots[slot].as_ref().expect("filled when the token exited");
        assert!(pos < s.len, "position {pos} not held");
        s.k.slice_set(&k, 1, pos)?;
        s.v.slice_set(&v, 1, pos)?;
        if let Some(m) = self.masked[slot].get_mut(pos) {
            *m = false;
        }
        Ok(())
    }

    fn append(&mut self, slot: usize, k: &Tensor, v: &Tensor) -> CResult<()> {
        let (k, v) = (k.to_dtype(self.dtype)?.contiguous()?, v.to_dtype(self.dtype)?.contiguous()?);
        let (h, n, d) = k.dims3()?;
        let fresh = |cap: usize| -> CResult<Tensor> { Tensor::zeros((h, cap, d), self.dtype, k.device()) };
        let s = match self.slots[slot].take() {
            None => {
                let cap = self.reserve.max(n);
                KvSlot { k: fresh(cap)?, v: fresh(cap)?, len: 0 }
            }
            Some(s) if s.len + n > s.k.dim(1)? => {
                let cap = (2 * s.k.dim(1)?).max(s.len + n);
                let (nk, nv) = (fresh(cap)?, fresh(cap)?);
                nk.slice_set(&s.k.narrow(1, 0, s.len)?, 1, 0)?;
                nv.slice_set(&s.v.narrow(1, 0, s.len)?, 1, 0)?;
                KvSlot { k: nk, v: nv, len: s.len }
            }
            Some(s) => s,
        };
        // Safe to write in place: views handed out cover positions below `len` only.
        s.k.slice_set(&k, 1, s.len)?;
        s.v.slice_set(&v, 1, s.len)?;
        self.slots[slot] = Some(KvSlot { len: s.len + n, ..s });
        Ok(())
    }
}

/// What a forward pass over new tokens returns.
pub struct ForwardOut {
    /// State after each computed loop and `model.norm`: `[n, hidden]` per loop.
    pub hidden: Vec<Tensor>,
    /// Exit-gate logit per computed loop: `[n]` per loop.
    pub gate_logits: Vec<Tensor>,
}

impl ForwardOut {
    pub fn loops_run(&self) -> usize {
        self.hidden.len()
    }
}

/// How many loops to run for the new tokens.
#[derive(Debug, Clone, Copy)]
pub enum LoopControl {
    /// Every loop (`T`).
    All,
    /// Stop after the first loop whose exit CDF reaches `q` (only for a single new token; longer
    /// inputs run all loops). Skipped (loop, layer) KV slots get the last computed loop's K/V.
    AdaptiveExit(f32),
}

/// Where a projection's input is seen by an [`Observer`]: the four distinct inputs of a decoder
/// layer's seven projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// The normed state that `q_proj`, `k_proj` and `v_proj` multiply.
    AttnIn,
    /// The attention output that `o_proj` multiplies.
    AttnOut,
    /// The normed state that `gate_proj` and `up_proj` multiply.
    MlpIn,
    /// `silu(gate) * up`, which `down_proj` multiplies.
    MlpDown,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::AttnIn, Site::AttnOut, Site::MlpIn, Site::MlpDown];

    /// The HF names (after `model.layers.{i}.`) of the weights that multiply this input.
    pub fn weights(self) -> &'static [&'static str] {
        match self {
            Site::AttnIn => &["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
            Site::AttnOut => &["self_attn.o_proj.weight"],
            Site::MlpIn => &["mlp.gate_proj.weight", "mlp.up_proj.weight"],
            Site::MlpDown => &["mlp.down_proj.weight"],
        }
    }
}

/// Sees what a forward pass multiplies (calibration: `imatrix`). The model calls it in order:
/// for each loop `t`, each layer's inputs, then `loop_done(t, gate logits [n])`.
pub trait Observer {
    /// The input `x [n, in]` of the projections of `site` in `layer`, loop `t`.
    fn input(&mut self, t: usize, layer: usize, site: Site, x: &Tensor) -> CResult<()>;
    /// Loop `t` has finished; `gate_logits [n]` are its exit-gate logits.
    fn loop_done(&mut self, t: usize, gate_logits: &Tensor) -> CResult<()>;
}

/// RMS norm of each row of `x` (f32) times `w`: candle-nn's fused op (CPU, CUDA and Metal
/// kernels), one pass instead of six tensor operations.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
}

impl OuroModel {
    /// Builds the model from any weight source.
    pub fn load(src: &dyn WeightSource, device: &Device) -> anyhow::Result<Self> {
        let cfg = src.config().clone();
        let dims = Dims::from_config(&cfg);
        let bytes = std::cell::Cell::new(0u64);
        let lin = |name: &str| -> anyhow::Result<Linear> {
            let (m, b) = src.linear(name, device)?;
            bytes.set(bytes.get() + b);
            Ok(m)
        };
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                q: lin(&format!("{p}.self_attn.q_proj.weight"))?,
                k: lin(&format!("{p}.self_attn.k_proj.weight"))?,
                v: lin(&format!("{p}.self_attn.v_proj.weight"))?,
                o: lin(&format!("{p}.self_attn.o_proj.weight"))?,
                gate: lin(&format!("{p}.mlp.gate_proj.weight"))?,
                up: lin(&format!("{p}.mlp.up_proj.weight"))?,
                down: lin(&format!("{p}.mlp.down_proj.weight"))?,
                n_in: src.vector(&format!("{p}.input_layernorm.weight"), device)?,
                n_in2: src.vector(&format!("{p}.input_layernorm_2.weight"), device)?,
                n_post: src.vector(&format!("{p}.post_attention_layernorm.weight"), device)?,
                n_post2: src.vector(&format!("{p}.post_attention_layernorm_2.weight"), device)?,
            });
        }
        let lm_name = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let layer_bytes = bytes.get();
        let lm_head = lin(lm_name)?;
        let lm_head_bytes = bytes.get() - layer_bytes;
        let bytes = bytes.get();
        let embed = src.embedding(device)?;
        let norm = src.vector("model.norm.weight", device)?;
        let gate_w = src.vector("model.early_exit_gate.weight", device)?.reshape((1, dims.hidden))?;
        let gate_b = src.vector("model.early_exit_gate.bias", device)?;
        let small = embed.bytes() + ((4 * dims.layers + 2) * dims.hidden + 1) as u64 * 4;
        let inv_freq = (0..dims.head_dim / 2)
            .map(|j| (1.0 / cfg.rope_theta.powf(2.0 * j as f64 / dims.head_dim as f64)) as f32)
            .collect();
        Ok(OuroModel {
            dims,
            config: cfg,
            embed,
            layers,
            norm,
            gate_w,
            gate_b,
            lm_head,
            inv_freq,
            device: device.clone(),
            weight_bytes: bytes + small,
            layer_bytes,
            lm_head_bytes,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs `n` loops per token instead of the config's `total_ut_steps`: what upstream computes
    /// with `total_ut_steps = n` (the same stack applied `n` times, the exit distribution over `n`
    /// steps with the last taking the remaining mass; the full KV cache then holds `n * L` slots).
    /// The released models were trained at 4; more loops are an extrapolation to measure.
    pub fn set_loops(&mut self, n: usize) -> anyhow::Result<()> {
        anyhow::ensure!((1..=MAX_LOOPS).contains(&n), "{n} loops per token: must be 1 to {MAX_LOOPS}");
        self.dims.loops = n;
        self.config.total_ut_steps = n;
        Ok(())
    }

    /// cos and sin tables `[n, head_dim / 2]` for positions `start..start+n` (each value serves
    /// both halves of the rotate-half layout).
    fn rope_tables(&self, start: usize, n: usize) -> CResult<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in start..start + n {
            for &f in &self.inv_freq {
                // torch computes freqs = position * inv_freq in f32
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, half), &self.device)?,
            Tensor::from_vec(sin, (n, half), &self.device)?,
        ))
    }

    /// Rotates `x` `[heads, n, d]` by the rope tables (rotate-half: `x1 cos - x2 sin`,
    /// `x2 cos + x1 sin`, as upstream): candle-nn's fused op.
    fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
        candle_nn::rotary_emb::rope(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)
    }

    /// Embeds token ids: `[n, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> CResult<Tensor> {
        self.embed.lookup(tokens, &self.device)
    }

    /// Logits `[n, vocab]` of a loop state `[n, hidden]`.
    pub fn logits(&self, state: &Tensor) -> CResult<Tensor> {
        self.lm_head.forward(state)
    }

    /// Runs the new `tokens` (positions `cache.len ..`) through the loops, reading and extending
    /// `cache`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, control: LoopControl) -> CResult<ForwardOut> {
        self.forward_observed(tokens, cache, control, None)
    }

    /// [`Self::forward`], showing every projection's input and every loop's gate logits to
    /// `observer`.
    pub fn forward_observed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        control: LoopControl,
        mut observer: Option<&mut dyn Observer>,
    ) -> CResult<ForwardOut> {
        let n = tokens.len();
        let start = cache.len;
        let (cos, sin) = self.rope_tables(start, n)?;
        // the general attention path's causal mask (the CPU path needs none)
        let mask = if n > 1 && !self.device.is_cpu() { Some(attend::causal_mask(start, n, &self.device)?) } else { None };
        let dims = &self.dims;
        let mut h = self.embed(tokens)?;
        let mut out = ForwardOut {
            hidden: vec![],
            gate_logits: vec![],
        };
        let mut gates_seen: Vec<f32> = vec![];
        for t in 0..dims.loops {
            // earlier tokens that exited before this loop, under SkipFill::Compute: run it for them first
            self.catch_up(cache, t)?;
            for (i, layer) in self.layers.iter().enumerate() {
                h = self.layer_step(layer, i, t, h, (&cos, &sin, mask.as_ref()), cache, None, observer.as_deref_mut())?;
            }
            h = rms_norm(&h, &self.norm, dims.eps)?;
            // a product and a row sum rather than candle's matmul, which on the CPU reads
            // /proc/cpuinfo on every call (it asks for the CPU count each time)
            let g = h.broadcast_mul(&self.gate_w)?.sum_keepdim(1)?.broadcast_add(&self.gate_b)?.squeeze(1)?;
            if let Some(o) = observer.as_deref_mut() {
                o.loop_done(t, &g)?;
            }
            out.hidden.push(h.clone());
            out.gate_logits.push(g.clone());
            if let LoopControl::AdaptiveExit(q) = control {
                if n == 1 && t + 1 < dims.loops {
                    gates_seen.push(g.to_vec1::<f32>()?[0]);
                    if exit::may_stop(&gates_seen, dims.loops, q) {
                        self.fill_skipped(cache, t, &h)?;
                        break;
                    }
                }
            }
        }
        cache.len += n;
        Ok(out)
    }

    /// Layer `i` of loop `t` for the rows `h`: the new tokens (positions from `cache.len`), or with
    /// `at` the one deferred token at that held position. `rope`: the rows' rotary tables and, for
    /// several new rows off the CPU, their causal mask.
    #[allow(clippy::too_many_arguments)]
    fn layer_step(
        &self,
        layer: &Layer,
        i: usize,
        t: usize,
        h: Tensor,
        rope: (&Tensor, &Tensor, Option<&Tensor>),
        cache: &mut KvCache,
        at: Option<usize>,
        mut observer: Option<&mut (dyn Observer + '_)>,
    ) -> CResult<Tensor> {
        let eps = self.dims.eps;
        let x = rms_norm(&h, &layer.n_in, eps)?;
        if let Some(o) = observer.as_deref_mut() {
            o.input(t, i, Site::AttnIn, &x)?;
        }
        // (the slot receives this call's K/V inside `attention`)
        let attn = self.attention(layer, &x, rope, cache, t, i, at, observer.as_deref_mut())?;
        let h = (h + rms_norm(&attn, &layer.n_in2, eps)?)?;
        let x = rms_norm(&h, &layer.n_post, eps)?;
        if let Some(o) = observer.as_deref_mut() {
            o.input(t, i, Site::MlpIn, &x)?;
        }
        let act = (layer.gate.forward(&x)?.silu()? * layer.up.forward(&x)?)?;
        if let Some(o) = observer {
            o.input(t, i, Site::MlpDown, &act)?;
        }
        let m = layer.down.forward(&act)?;
        h + rms_norm(&m, &layer.n_post2, eps)?
    }

    /// Under [`SkipFill::Compute`], before the new tokens run loop `t`: every deferred token that
    /// has not run loop `t` runs its missing loops up to `t`, in position order, each attending to
    /// the positions up to its own (whose loops are complete by then: earlier deferred tokens went
    /// first), so that its keys and values in loop `t` are those of the full pass.
    fn catch_up(&self, cache: &mut KvCache, t: usize) -> CResult<()> {
        if cache.deferred.iter().all(|d| d.loops_done > t) {
            return Ok(());
        }
        let mut deferred = std::mem::take(&mut cache.deferred);
        for d in deferred.iter_mut() {
            if d.loops_done > t {
                continue;
            }
            let (cos, sin) = self.rope_tables(d.pos, 1)?;
            while d.loops_done <= t {
                let l = d.loops_done;
                let mut h = d.h.clone();
                for (i, layer) in self.layers.iter().enumerate() {
                    h = self.layer_step(layer, i, l, h, (&cos, &sin, None), cache, Some(d.pos), None)?;
                }
                d.h = rms_norm(&h, &self.norm, self.dims.eps)?;
                d.loops_done += 1;
                cache.caught_up += 1;
            }
        }
        deferred.retain(|d| d.loops_done < self.dims.loops);
        cache.deferred = deferred;
        Ok(())
    }

    /// After an early exit at loop `t` with state `h` (the next loop's input), gives the deeper
    /// (loop, layer) slots of the full cache an entry for this token, so that later tokens find
    /// one in every slot: loop `t`'s K/V copied, or a masked one (which `Compute` fills in when a
    /// later token needs it, keeping `h` until then).
    fn fill_skipped(&self, cache: &mut KvCache, t: usize, h: &Tensor) -> CResult<()> {
        if cache.policy != KvPolicy::Full {
            return Ok(());
        }
        if cache.fill == SkipFill::Compute {
            cache.deferred.push(Deferred { pos: cache.len, loops_done: t + 1, h: h.clone() });
        }
        let l = self.dims.layers;
        for i in 0..l {
            let (k, v) = cache.get(t * l + i)?.expect("computed slot");
            let len = k.dim(1)?;
            let k_new = k.narrow(1, len - 1, 1)?;
            let v_new = v.narrow(1, len - 1, 1)?;
            // made contiguous once for all the deeper slots (each append would copy a view)
            let (k_new, v_new) = match cache.fill {
                SkipFill::Copy => (k_new.contiguous()?, v_new.contiguous()?),
                SkipFill::Mask | SkipFill::Compute => (k_new.zeros_like()?, v_new.zeros_like()?),
            };
            for t2 in t + 1..self.dims.loops {
                let slot = t2 * l + i;
                if cache.fill != SkipFill::Copy {
                    let m = &mut cache.masked[slot];
                    m.resize(len - 1, false);
                    m.push(true);
                }
                cache.append(slot, &k_new, &v_new)?;
            }
        }
        Ok(())
    }

    /// Self-attention of layer `i` in loop `t`: writes this call's keys and values (after rope)
    /// into the layer's slot (full: its own slot; shared-last: the layer's slot, appended in the
    /// first loop and overwritten in place by each later one, so that it ends holding the last
    /// loop computed) and returns the output `[n, hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        (cos, sin, mask): (&Tensor, &Tensor, Option<&Tensor>),
        cache: &mut KvCache,
        t: usize,
        i: usize,
        at: Option<usize>,
        observer: Option<&mut (dyn Observer + '_)>,
    ) -> CResult<Tensor> {
        let d = &self.dims;
        let n = x.dim(0)?;
        let heads = |y: Tensor, h: usize| -> CResult<Tensor> { y.reshape((n, h, d.head_dim))?.transpose(0, 1)?.contiguous() };
        let q = Self::apply_rope(&heads(layer.q.forward(x)?, d.heads)?, cos, sin)?;
        let k = Self::apply_rope(&heads(layer.k.forward(x)?, d.kv_heads)?, cos, sin)?;
        let v = heads(layer.v.forward(x)?, d.kv_heads)?;
        let slot = match cache.policy {
            KvPolicy::Full => t * d.layers + i,
            KvPolicy::SharedLast => i,
        };
        if let Some(pos) = at {
            cache.write_at(slot, pos, &k, &v)?;
        } else if cache.policy == KvPolicy::SharedLast && t > 0 {
            cache.overwrite_last(slot, &k, &v)?;
        } else {
            cache.append(slot, &k, &v)?;
        }
        let (k_all, v_all) = cache.get(slot)?.expect("just written");
        let o = match at {
            None => attend::attend(&q, &k_all, &v_all, &cache.masked[slot], mask)?,
            Some(pos) => {
                // a deferred token sees the positions up to its own
                let len = k_all.dim(1)?;
                let mut m = cache.masked[slot].clone();
                m.resize(len, false);
                m[pos + 1..].iter_mut().for_each(|x| *x = true);
                attend::attend(&q, &k_all, &v_all, &m, None)?
            }
        };
        if let Some(obs) = observer {
            obs.input(t, i, Site::AttnOut, &o)?;
        }
        layer.o.forward(&o)
    }

    /// Full-sequence forward without cache (all loops).
    pub fn forward_full(&self, tokens: &[u32], policy: KvPolicy) -> CResult<ForwardOut> {
        let mut cache = KvCache::new(&self.dims, policy);
        self.forward(tokens, &mut cache, LoopControl::All)
    }

    /// Stacks per-loop tensors into one `[T, ...]` tensor.
    pub fn stack(parts: &[Tensor]) -> CResult<Tensor> {
        Tensor::stack(parts, 0)
    }

    /// Converts a tensor to f32 (no-op for f32).
    pub fn f32(t: &Tensor) -> CResult<Tensor> {
        t.to_dtype(DType::F32)
    }
}

/// Per-loop results of a forward pass as plain arrays, and the upstream logits selection.
pub struct LoopOutputs {
    /// `[T][n * vocab]` logits per loop.
    pub step_logits: Vec<Vec<f32>>,
    /// `[T][n]` gate logits.
    pub gate_logits: Vec<Vec<f32>>,
    /// `[n][T]` exit pdf per token.
    pub pdf: Vec<Vec<f32>>,
    pub n: usize,
    pub vocab: usize,
}

impl LoopOutputs {
    /// Computes logits for every loop of `out` (which must have run all loops).
    pub fn new(model: &OuroModel, out: &ForwardOut) -> CResult<Self> {
        let step_logits = out
            .hidden
            .iter()
            .map(|h| model.logits(h)?.flatten_all()?.to_vec1::<f32>())
            .collect::<CResult<Vec<_>>>()?;
        let gate_logits = out
            .gate_logits
            .iter()
            .map(|g| g.to_vec1::<f32>())
            .collect::<CResult<Vec<_>>>()?;
        let n = gate_logits.first().map_or(0, |g| g.len());
        let pdf = (0..n)
            .map(|j| exit::exit_pdf(&gate_logits.iter().map(|g| g[j]).collect::<Vec<_>>()))
            .collect();
        Ok(LoopOutputs {
            step_logits,
            gate_logits,
            pdf,
            n,
            vocab: model.dims.vocab,
        })
    }

    /// The loop token `j` reads out under `mode` (`None` for the weighted mix).
    pub fn exit_loop(&self, j: usize, mode: ExitMode) -> Option<usize> {
        let last = self.step_logits.len() - 1;
        match mode {
            ExitMode::Step(k) => Some(k.min(last)),
            ExitMode::Threshold(q) => Some(exit::threshold_exit(&self.pdf[j], q)),
            ExitMode::Last => Some(last),
            ExitMode::Weighted => None,
        }
    }

    /// Logits `[n * vocab]` that upstream returns in `mode`.
    pub fn logits(&self, mode: ExitMode) -> Vec<f32> {
        let v = self.vocab;
        let mut out = vec![0f32; self.n * v];
        for j in 0..self.n {
            let row = &mut out[j * v..(j + 1) * v];
            match self.exit_loop(j, mode) {
                Some(t) => row.copy_from_slice(&self.step_logits[t][j * v..(j + 1) * v]),
                None => {
                    for (t, steps) in self.step_logits.iter().enumerate() {
                        let p = self.pdf[j][t];
                        for (o, x) in row.iter_mut().zip(&steps[j * v..(j + 1) * v]) {
                            *o += p * x;
                        }
                    }
                }
            }
        }
        out
    }
}

pub use exit::ExitMode;

impl OuroModel {
    /// The config's default selection: `early_exit_step` if set, else the CDF rule with
    /// `early_exit_threshold` (1.0 in the released configs), else the last loop.
    pub fn default_mode(&self) -> ExitMode {
        if let Some(k) = self.config.early_exit_step {
            ExitMode::Step(k)
        } else if let Some(q) = self.config.early_exit_threshold {
            ExitMode::Threshold(q as f32)
        } else {
            ExitMode::Last
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// `--kv shared-last` against its definition ("every loop of a new token reads the earlier
    /// tokens' last-loop keys and values", spec section 4, the paper's Table 14) run through the
    /// full per-loop cache: before each new token, every loop's slot of layer i is made a copy of
    /// the last loop's. Both decoders must give the same states bit for bit at every loop.
    #[test]
    fn shared_last_decodes_as_its_definition_through_the_full_cache() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/gqa_bf16");
        let src = source::HfSource { checkpoint: crate::checkpoint::Checkpoint::open(&dir).unwrap() };
        let m = OuroModel::load(&src, &Device::Cpu).unwrap();
        let (loops, layers) = (m.dims.loops, m.dims.layers);
        let toks: Vec<u32> = (0..14).map(|i| (i * 53 + 7) % 300).collect();
        let mut shared = KvCache::new(&m.dims, KvPolicy::SharedLast);
        let mut full = KvCache::new(&m.dims, KvPolicy::Full);
        m.forward(&toks[..5], &mut shared, LoopControl::All).unwrap();
        m.forward(&toks[..5], &mut full, LoopControl::All).unwrap();
        // the plain full cache, for contrast: the first new token's loop 1 reads other keys there
        let mut plain = KvCache::new(&m.dims, KvPolicy::Full);
        m.forward(&toks[..5], &mut plain, LoopControl::All).unwrap();
        let p = m.forward(&toks[5..6], &mut plain, LoopControl::All).unwrap();
        let mut first = None;
        for &t in &toks[5..] {
            // the definition: all loops' slots hold the last loop's keys and values (deep copies:
            // the cache writes into its buffers in place)
            for i in 0..layers {
                let last = full.slots[(loops - 1) * layers + i].as_ref().unwrap();
                let (k, v, len) = (last.k.copy().unwrap(), last.v.copy().unwrap(), last.len);
                for l in 0..loops - 1 {
                    full.slots[l * layers + i] = Some(KvSlot { k: k.copy().unwrap(), v: v.copy().unwrap(), len });
                }
            }
            let a = m.forward(&[t], &mut shared, LoopControl::All).unwrap();
            let b = m.forward(&[t], &mut full, LoopControl::All).unwrap();
            assert_eq!(a.hidden.len(), loops);
            for (x, y) in a.hidden.iter().zip(&b.hidden) {
                assert_eq!(x.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap(), "token {t}");
            }
            first.get_or_insert(a.hidden[0].to_vec2::<f32>().unwrap());
        }
        assert_eq!((shared.len, full.len), (toks.len(), toks.len()));
        assert_ne!(first, Some(p.hidden[0].to_vec2::<f32>().unwrap()), "shared-last must differ from the full cache");
        assert_eq!(shared.bytes() * loops as u64, full.bytes());
    }
}
