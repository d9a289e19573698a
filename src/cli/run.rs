//! `ouro-quant run`: generate with an HF checkpoint, a GGUF file or an MLX directory, streaming the
//! text, and report prefill/decode speed, loops per token, memory and which kernels ran.

use std::path::PathBuf;
use std::process::ExitCode;

use ouro_quant::inspect;
use ouro_quant::model::generate::{self, GenerateOptions, Sampling};
use ouro_quant::model::placement::{self, Target};
use ouro_quant::model::{dump, source};

use super::{check_thresholds, device, print_json, DeviceArg, KvArgs, LoopsArg};

#[derive(clap::Args)]
pub struct Args {
    /// Model: an HF checkpoint directory, a GGUF file or an MLX directory.
    pub model: PathBuf,
    /// Raw prompt text (no template).
    #[arg(long, conflicts_with_all = ["chat", "prompt_tokens"], required_unless_present_any = ["chat", "prompt_tokens"])]
    pub prompt: Option<String>,
    /// The prompt as token ids, comma separated (no tokenizer involved).
    #[arg(long, conflicts_with = "chat")]
    pub prompt_tokens: Option<String>,
    /// A user message, wrapped in the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// Append `<think>\n` after the assistant header (Thinking models only think then).
    #[arg(long, requires = "chat", conflicts_with_all = ["prompt", "prompt_tokens"])]
    pub thinking: bool,
    /// Generate at most this many tokens (generation also stops at a stop token and at the
    /// model's context).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities add up to p
    /// (1 keeps every token).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler (the same seed, options and model give the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop each token's loops once its exit CDF reaches q (saves compute; without it, or at
    /// 1.0, every loop runs).
    #[arg(long)]
    pub exit_threshold: Option<f32>,
    #[command(flatten)]
    pub loops: LoopsArg,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Where to run: cpu, or cuda / metal in builds with that feature.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Refuse to start if the run would need more memory than this: on CUDA, GPU memory
    /// (weights held there, KV cache for prompt + max-tokens, prefill scratch, the CUDA runtime);
    /// elsewhere the process's memory. Bytes, or a size such as 4.6G (10^9) or 4.6GiB (2^30).
    #[arg(long, value_parser = super::parse_size)]
    pub max_memory: Option<u64>,
    /// Print the figures as JSON at the end (text still streams to stderr).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    check_thresholds(a.exit_threshold.as_slice())?;
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    anyhow::ensure!((0.0..=1.0).contains(&sampling.top_p) && sampling.top_p > 0.0, "--top-p must lie in (0, 1]");
    anyhow::ensure!(
        sampling.temperature.is_finite() && sampling.temperature >= 0.0,
        "--temperature {}: must be a finite number >= 0 (0 = greedy)",
        sampling.temperature
    );
    let kv_dtype = a.kv.dtype();
    let device = device(a.device)?;
    if let Some(limit) = a.max_memory {
        check_memory(&a, limit, Target::of(&device), kv_dtype)?;
    }
    let mut loaded = source::load(&a.model, &device)?;
    a.loops.apply(&mut loaded.model)?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{}: no tokenizer.json, cannot encode a prompt", a.model.display()))?;
    let prompt: Vec<u32> = if let Some(t) = &a.prompt_tokens {
        let ids = dump::parse_token_list(t)?;
        let vocab = loaded.model.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            anyhow::bail!("--prompt-tokens: id {bad} is outside the vocabulary ({vocab} tokens)");
        }
        ids
    } else {
        let text = match (&a.prompt, &a.chat) {
            (Some(p), _) => p.clone(),
            (None, Some(c)) => generate::render_chat(loaded.chat_template.as_deref(), c, a.thinking)?,
            _ => unreachable!("clap requires one"),
        };
        tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?.get_ids().to_vec()
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling,
        exit_threshold: a.exit_threshold,
        readout: None,
        kv: a.kv.kv,
        kv_fill: a.kv.kv_fill,
        kv_dtype,
        stop_ids: loaded.model.config.stop_token_ids(),
    };
    let mut ids: Vec<u32> = vec![];
    let mut printed = 0usize;
    let mut sink: Box<dyn Write> = if a.json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
    let g = generate::generate(&loaded.model, &prompt, &opts, &mut |id| {
        ids.push(id);
        if let Ok(s) = tok.decode(&ids, true) {
            // Print only whole characters: a byte-level token may end mid-character.
            if s.len() > printed && !s.ends_with('\u{fffd}') {
                let _ = sink.write_all(s[printed..].as_bytes());
                let _ = sink.flush();
                printed = s.len();
            }
        }
    })?;
    let _ = writeln!(sink);
    let s = &g.stats;
    if a.json {
        let text = tok.decode(&g.tokens, true).unwrap_or_default();
        print_json("ouro-quant-run-1", &serde_json::json!({"model": loaded.description, "text": text, "tokens": g.tokens, "stats": s}))?;
    } else {
        eprintln!(
            "prefill {} tokens at {:.1} tok/s; decode {} tokens at {:.1} tok/s; {:.2} loops/token{}; weights {}; KV {} ({:?}, {:?}); stopped by {}; projections: {}",
            s.prompt_tokens,
            s.prefill_tokens_per_s,
            s.generated_tokens,
            s.decode_tokens_per_s,
            s.mean_loops_per_token,
            if a.kv.kv_fill == ouro_quant::model::SkipFill::Compute { format!(" (+{:.2} run late for earlier tokens)", s.mean_caught_up_loops_per_token) } else { String::new() },
            inspect::human_bytes(s.weight_bytes),
            inspect::human_bytes(s.kv_bytes),
            a.kv.kv,
            kv_dtype,
            s.stopped_by,
            s.kernels.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses, before anything is loaded, a run whose memory would exceed `limit` on `target`:
/// weights as the loader will hold them there ([`placement`]), the KV cache sized for prompt +
/// max-tokens, the prefill's scratch and the runtime (the CUDA context on a CUDA device).
fn check_memory(a: &Args, limit: u64, target: Target, kv_dtype: candle_core::DType) -> anyhow::Result<()> {
    let fp = source::footprint(&a.model, target)?;
    let mut config = fp.config;
    if let Some(n) = a.loops.loops {
        config.total_ut_steps = n as usize;
    }
    let dims = ouro_quant::model::Dims::from_config(&config);
    // an upper bound on the prompt's tokens: one per byte of text (+16 for the chat template)
    let prompt = match (&a.prompt_tokens, &a.prompt, &a.chat) {
        (Some(t), _, _) => dump::parse_token_list(t)?.len(),
        (None, Some(p), _) => p.len(),
        (None, None, Some(c)) => c.len() + 16,
        _ => 0,
    }
    .min(config.max_position_embeddings);
    let ctx = prompt.saturating_add(a.max_tokens).min(config.max_position_embeddings);
    let weights = fp.weights.counted(target);
    let kv = generate::planned_kv_bytes(&dims, a.kv.kv, kv_dtype, ctx);
    let scratch = placement::scratch_bytes(&config, prompt.max(1));
    let runtime = placement::runtime_bytes(target);
    let need = weights + kv + scratch + runtime;
    if need > limit {
        let h = inspect::human_bytes;
        let memory = if target == Target::Cuda { "GPU memory" } else { "memory" };
        let runtime = if runtime > 0 { format!(" + {} for the CUDA runtime (an estimate)", h(runtime)) } else { String::new() };
        let host = if target == Target::Cuda && fp.weights.host > 0 { format!("; {} more stays in host RAM", h(fp.weights.host)) } else { String::new() };
        anyhow::bail!(
            "--max-memory {limit}: this run needs about {need} bytes ({}) of {memory}: {} of weights + {} of KV cache for up to {ctx} tokens + {} of scratch for a {prompt}-token prefill{runtime}{host}",
            h(need),
            h(weights),
            h(kv),
            h(scratch)
        );
    }
    Ok(())
}
