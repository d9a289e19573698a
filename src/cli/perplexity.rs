//! `ouro-quant perplexity`: one model's perplexity over a text as a decoder sees it (prefill, then
//! token by token through the KV cache), with all loops and with adaptive exit at each threshold:
//! what early exit costs in quality and gains in speed. Every loop's perplexity comes from one
//! batched pass per chunk, as llama-perplexity scores a text; `--batched` stops there (seconds
//! instead of minutes on a large model).

use std::path::PathBuf;
use std::process::ExitCode;

use ouro_quant::model::source;

use super::{check_thresholds, device, print_json, DeviceArg, EvalArgs, KvArgs, LoopsArg};

/// The exit thresholds `validate` and `perplexity` study by default (1.0: a token stops only once
/// its exit CDF is exhausted, the check that exiting itself changes nothing).
pub const THRESHOLDS: &str = "0.5,0.7,0.9,1.0";

#[derive(clap::Args)]
pub struct Args {
    /// Model: an HF checkpoint directory, a GGUF file or an MLX directory.
    pub model: PathBuf,
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Exit thresholds q to compare with all loops, comma separated (the same option as run's and
    /// validate's).
    #[arg(long, value_delimiter = ',', default_value = THRESHOLDS)]
    pub exit_threshold: Vec<f32>,
    #[command(flatten)]
    pub loops: LoopsArg,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Where to run: cpu, or cuda / metal in builds with that feature.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Score each chunk in one batched pass only, as llama-perplexity does: the perplexity with all
    /// loops and at each fixed depth, without the token-by-token decode that adaptive exit needs
    /// (no exit rows, no decode speeds).
    #[arg(long, conflicts_with_all = ["exit_threshold", "kv", "kv_fill", "kv_dtype"])]
    pub batched: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let KvArgs { kv, kv_fill, .. } = a.kv;
    let kv_dtype = a.kv.dtype();
    let (model, text, ctx, chunks) = (&a.model, &a.eval.text, a.eval.ctx, a.eval.chunks);
    check_thresholds(&a.exit_threshold)?;
    a.eval.check(&[model])?;
    let body = std::fs::read_to_string(text).map_err(|e| anyhow::anyhow!("{}: {e}", text.display()))?;
    let mut loaded = source::load(model, &device(a.device)?)?;
    a.loops.apply(&mut loaded.model)?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{}: no tokenizer.json to tokenize the text with", model.display()))?;
    let ids = tok.encode(body.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", text.display()))?.get_ids().to_vec();
    let spans = ouro_quant::eval::scored_chunks(ids.len(), ctx, chunks).map_err(|e| anyhow::anyhow!("{}: {e}", text.display()))?;
    let m = &loaded.model;
    // per-loop quality: each chunk in one pass with all loops, every loop's readout scored on the
    // same tokens (what validate reports per loop; with --loops N, up to N)
    let t0 = std::time::Instant::now();
    let full = ouro_quant::eval::evaluate(m, &ids, ctx, chunks, &mut |_, _| {})?;
    let secs = t0.elapsed().as_secs_f64();
    let per_loop: Vec<(f64, f64)> = (0..m.dims.loops).map(|t| ouro_quant::eval::perplexity(&full.nll_loop(t, None))).collect();
    let (ppl, ppl_se) = *per_loop.last().expect("at least one loop");
    let batched = serde_json::json!({
        "scored_tokens": full.len(),
        "ppl": ppl,
        "ppl_se": ppl_se,
        "seconds": secs,
        "tokens_per_s": (spans.len() * ctx) as f64 / secs.max(1e-9),
    });
    let per_loop: Vec<f64> = per_loop.iter().map(|p| p.0).collect();
    let per_loop_line = || per_loop.iter().enumerate().map(|(t, p)| format!("loop {} {p:.4}", t + 1)).collect::<Vec<_>>().join(", ");
    // what both forms of the report hold
    let mut report = serde_json::json!({
        "model": loaded.description,
        "text": text.display().to_string(),
        "ctx": ctx,
        "chunks": spans.len(),
        "loops": m.dims.loops,
        "batched": batched,
        "per_loop_ppl": per_loop,
    });
    if a.batched {
        if a.json {
            print_json("ouro-quant-perplexity-1", &report)?;
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{}: {} chunks of {ctx}, {} tokens scored in one pass per chunk ({:.1} tok/s)",
            loaded.description,
            spans.len(),
            full.len(),
            batched["tokens_per_s"].as_f64().unwrap_or(0.0)
        );
        println!("perplexity, all {} loops: {ppl:.4} ± {ppl_se:.4}", m.dims.loops);
        println!("per loop: {}", per_loop_line());
        return Ok(ExitCode::SUCCESS);
    }
    // every threshold in turn on each chunk: speeds compared moments apart, chunk by chunk
    let qs: Vec<Option<f32>> = std::iter::once(None).chain(a.exit_threshold.iter().map(|&q| Some(q))).collect();
    let runs = ouro_quant::eval::decode_evals(m, &ids, ctx, chunks, &qs, kv, kv_fill, kv_dtype)?;
    let base = runs[0].clone();
    if a.json {
        let o = report.as_object_mut().expect("an object");
        o.insert("kv".into(), serde_json::json!(kv));
        o.insert("kv_fill".into(), serde_json::json!(kv_fill));
        o.insert("kv_dtype".into(), serde_json::json!(format!("{kv_dtype:?}").to_lowercase()));
        o.insert("runs".into(), serde_json::json!(runs));
        o.insert("ppl_rise_pct".into(), serde_json::json!(runs.iter().map(|r| 100.0 * (r.ppl / base.ppl - 1.0)).collect::<Vec<_>>()));
        o.insert("speedup".into(), serde_json::json!(runs.iter().map(|r| r.speedup_over(&base)).collect::<Vec<_>>()));
        print_json("ouro-quant-perplexity-1", &report)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: {} chunks of {ctx}, {} decoded tokens scored, KV {kv:?} in {kv_dtype:?} (skipped loops: {kv_fill:?})",
        loaded.description,
        spans.len(),
        base.scored_tokens
    );
    let compute = kv_fill == ouro_quant::model::SkipFill::Compute;
    if compute {
        println!("{:<10} {:>16} {:>9} {:>12} {:>12} {:>12} {:>9}", "exit", "perplexity", "change", "loops/token", "+ run late", "decode tok/s", "speed-up");
    } else {
        println!("{:<10} {:>16} {:>9} {:>12} {:>12} {:>9}", "exit", "perplexity", "change", "loops/token", "decode tok/s", "speed-up");
    }
    for r in &runs {
        let late = if compute { format!(" {:>12.2}", r.mean_caught_up_loops_per_token) } else { String::new() };
        println!(
            "{:<10} {:>9.4} ± {:<5.4} {:>+8.2}% {:>12.2}{late} {:>12.1} {:>8.2}x",
            r.exit_threshold.map_or("all loops".to_string(), |q| format!("q = {q}")),
            r.ppl,
            r.ppl_se,
            100.0 * (r.ppl / base.ppl - 1.0),
            r.mean_loops_per_token,
            r.decode_tokens_per_s,
            r.speedup_over(&base)
        );
    }
    println!("per loop (one pass per chunk, each loop read out, {:.1} tok/s): {}", batched["tokens_per_s"].as_f64().unwrap_or(0.0), per_loop_line());
    Ok(ExitCode::SUCCESS)
}
