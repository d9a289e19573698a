//! Text generation: chat template, sampling, the prefill/decode loop with adaptive exit, and the
//! figures a user checks a converted model by (tokens/s, loops per token, memory).

use std::time::Instant;

use serde::Serialize;

use super::{ExitMode, KvCache, KvPolicy, LoopControl, OuroModel};

/// Sampling settings; temperature 0 is greedy.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

/// Everything a generation needs besides the model and the prompt.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// `Some(q)`: stop each decoded token's loops once its exit CDF reaches q.
    pub exit_threshold: Option<f32>,
    /// Which loop's logits choose each token when every loop runs (default: the exit threshold's
    /// rule, else the config's default mode); `ExitMode::Step(k)` reads loop k + 1 out.
    pub readout: Option<ExitMode>,
    pub kv: KvPolicy,
    /// What the full cache holds for loops a token skipped (with `exit_threshold`).
    pub kv_fill: super::SkipFill,
    /// Storage of keys and values: F32, or F16 for half the memory.
    pub kv_dtype: candle_core::DType,
    pub stop_ids: Vec<u32>,
}

/// Figures of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Mean loops run per decoded token (T when no exit threshold is set).
    pub mean_loops_per_token: f64,
    /// Under `--kv-fill compute`: loops run later for earlier decoded tokens, per decoded token
    /// (0 under the other fills).
    pub mean_caught_up_loops_per_token: f64,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub stopped_by: String,
    /// Projections per kernel that multiplies them.
    pub kernels: std::collections::BTreeMap<String, usize>,
}

/// The token ids generated and the figures.
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stats: GenerateStats,
}

/// Renders the chat template of `tokenizer_config.json` (or ChatML when there is none) for one user
/// message with the generation prompt; `thinking` appends `<think>\n` after the assistant header.
pub fn render_chat(template: Option<&str>, user: &str, thinking: bool) -> anyhow::Result<String> {
    let template = template.unwrap_or(crate::synth::CHATML_TEMPLATE);
    let mut env = minijinja::Environment::new();
    env.add_template("chat", template)
        .map_err(|e| anyhow::anyhow!("chat template does not parse: {e}"))?;
    let ctx = serde_json::json!({
        "messages": [{"role": "user", "content": user}],
        "add_generation_prompt": true,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
    });
    let mut s = env
        .get_template("chat")?
        .render(ctx)
        .map_err(|e| anyhow::anyhow!("chat template failed to render: {e}"))?;
    if thinking {
        s.push_str("<think>\n");
    }
    Ok(s)
}

/// A seeded generator for sampling: uniform floats from the crate's SplitMix64.
struct Rng(crate::synth::SplitMix);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(crate::synth::SplitMix(seed))
    }
    fn uniform(&mut self) -> f32 {
        (self.0.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Picks the next token from one row of logits.
fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / s.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|&p| {
                acc += p;
                acc >= s.top_p
            })
            .map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let r = rng.uniform();
    let mut acc = 0.0;
    for (p, &i) in probs.iter().zip(&idx) {
        acc += p;
        if r < acc {
            return i as u32;
        }
    }
    *idx.last().expect("non-empty") as u32
}

/// Generates after `prompt`, calling `on_token` with each new id as soon as it is chosen.
pub fn generate(
    model: &OuroModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(u32),
) -> anyhow::Result<Generation> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt encodes to no tokens");
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= model.dims.vocab) {
        anyhow::bail!("token id {bad} is outside the model's vocabulary ({})", model.dims.vocab);
    }
    let limit = model.config.max_position_embeddings;
    anyhow::ensure!(
        prompt.len() <= limit,
        "the prompt has {} tokens, more than the model's context of {limit} (max_position_embeddings)",
        prompt.len()
    );
    let mut rng = Rng::new(opts.sampling.seed);
    // Sized for what can happen: the context ends generation before max-tokens can outgrow it.
    let mut cache = KvCache::new(&model.dims, opts.kv)
        .with_skip_fill(opts.kv_fill)
        .with_dtype(opts.kv_dtype)
        .with_capacity(prompt.len().saturating_add(opts.max_tokens).min(limit));
    let default_mode = model.default_mode();

    let t0 = Instant::now();
    let out = model.forward(prompt, &mut cache, LoopControl::All)?;
    let last_row = |out: &super::ForwardOut, mode: ExitMode| -> anyhow::Result<Vec<f32>> {
        // Only the last token's logits are needed: select its loop from its own pdf.
        let n = out.hidden[0].dim(0)?;
        let gates: Vec<f32> = out
            .gate_logits
            .iter()
            .map(|g| Ok(g.to_vec1::<f32>()?[n - 1]))
            .collect::<anyhow::Result<_>>()?;
        let loops = out.hidden.len();
        let t = if loops < model.dims.loops {
            loops - 1 // stopped early: the exit loop is the last computed
        } else {
            match mode {
                ExitMode::Step(k) => k.min(loops - 1),
                ExitMode::Threshold(q) => super::exit::threshold_exit(&super::exit::exit_pdf(&gates), q),
                ExitMode::Last | ExitMode::Weighted => loops - 1,
            }
        };
        let h = out.hidden[t].narrow(0, n - 1, 1)?;
        Ok(model.logits(&h)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let mode = opts.readout.or(opts.exit_threshold.map(ExitMode::Threshold)).unwrap_or(default_mode);
    let mut next = sample(&last_row(&out, mode)?, &opts.sampling, &mut rng);
    let prefill_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut tokens = vec![];
    let mut loops_total = 0usize;
    let mut steps = 0usize;
    let mut stopped_by = "max-tokens".to_string();
    let control = opts
        .exit_threshold
        .map(LoopControl::AdaptiveExit)
        .unwrap_or(LoopControl::All);
    while tokens.len() < opts.max_tokens {
        if opts.stop_ids.contains(&next) {
            stopped_by = format!("stop token {next}");
            break;
        }
        tokens.push(next);
        on_token(next);
        if tokens.len() == opts.max_tokens {
            break;
        }
        if cache.len + 1 > limit {
            stopped_by = format!("context limit ({limit})");
            break;
        }
        let out = model.forward(&[next], &mut cache, control)?;
        steps += 1;
        loops_total += out.loops_run();
        next = sample(&last_row(&out, mode)?, &opts.sampling, &mut rng);
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    Ok(Generation {
        stats: GenerateStats {
            prompt_tokens: prompt.len(),
            generated_tokens: tokens.len(),
            prefill_seconds,
            decode_seconds,
            prefill_tokens_per_s: prompt.len() as f64 / prefill_seconds.max(1e-9),
            decode_tokens_per_s: steps as f64 / decode_seconds.max(1e-9),
            mean_loops_per_token: if steps == 0 {
                model.dims.loops as f64
            } else {
                loops_total as f64 / steps as f64
            },
            mean_caught_up_loops_per_token: cache.caught_up_loops() as f64 / steps.max(1) as f64,
            weight_bytes: model.weight_bytes,
            kernels: model.kernels(),
            kv_bytes: cache.bytes(),
            stopped_by,
        },
        tokens,
    })
}

/// Bytes of the KV cache for `tokens` tokens with keys and values of `dtype`.
pub fn planned_kv_bytes(model_dims: &super::Dims, policy: KvPolicy, dtype: candle_core::DType, tokens: usize) -> u64 {
    let slots = match policy {
        KvPolicy::Full => model_dims.loops * model_dims.layers,
        KvPolicy::SharedLast => model_dims.layers,
    };
    (2 * slots * model_dims.kv_heads * model_dims.head_dim * dtype.size_in_bytes() * tokens) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_with_generation_prompt_and_thinking() {
        let s = render_chat(None, "hi", true).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n");
    }

    #[test]
    fn sampling_respects_top_k_and_greedy() {
        let logits = [0.0, 5.0, 4.9, -1.0];
        let mut rng = Rng::new(1);
        let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        let k2 = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0, seed: 0 };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(sample(&logits, &k2, &mut rng));
        }
        assert_eq!(seen, [1u32, 2].into_iter().collect());
    }
}
