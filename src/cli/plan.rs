//! `ouro-quant plan`: will it fit? Weights + KV cache + runtime for every output format against a
//! device's free memory, and the longest context that fits.

use std::path::PathBuf;
use std::process::ExitCode;

use ouro_quant::inspect;
use ouro_quant::model::{source, KvPolicy};
use ouro_quant::model::placement::Target;
use ouro_quant::plan;
use ouro_quant::synth::{self, Preset};

use super::{print_json, LoopsArg};

/// The deployment context `plan` sizes the KV cache for when none is given (the model's own,
/// where that is shorter).
pub const PLAN_CTX: usize = 4096;

#[derive(clap::Args)]
pub struct Args {
    /// A model (HF directory, GGUF file or MLX directory) whose config to plan for.
    #[arg(conflicts_with = "preset", required_unless_present = "preset")]
    pub model: Option<PathBuf>,
    /// Plan for a released model's shapes instead.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// A device profile (formats/devices.toml, or --devices) whose free memory is the budget:
    /// the machine a model is planned for, not where ouro-quant computes (run's --device).
    #[arg(long, conflicts_with = "memory", required_unless_present = "memory")]
    pub device: Option<String>,
    /// The budget: bytes, or a size such as 4.6G (G = 10^9) or 4.6GiB (2^30).
    #[arg(long, value_parser = super::parse_size)]
    pub memory: Option<u64>,
    /// With --memory: the kind of memory it is, which decides how weights are held in it (a
    /// device profile names its own kind).
    #[arg(long, value_enum, default_value = "cpu", conflicts_with = "device")]
    pub kind: Target,
    /// The deployment context to plan for (tokens held in the KV cache; not validate's
    /// evaluation chunk): 4096 by default, or the model's context where that is shorter.
    #[arg(long)]
    pub ctx: Option<usize>,
    /// KV cache: full (one slot per loop and layer, as upstream) or shared-last (one per layer).
    #[arg(long, value_enum, default_value = "full")]
    pub kv: KvPolicy,
    #[command(flatten)]
    pub loops: LoopsArg,
    /// KV-cache storage: f16 (the default everywhere, as in llama.cpp and mlx-lm), f32, or q8_0
    /// (llama.cpp's `--cache-type-k q8_0`; this runner does not hold it).
    #[arg(long, value_enum, default_value = "f16")]
    pub kv_dtype: plan::KvDtype,
    /// More device profiles (TOML, same form as formats/devices.toml).
    #[arg(long)]
    pub devices: Option<PathBuf>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = match (&a.model, a.preset) {
        (Some(m), _) if m.is_file() => source::GgufSource::open(m)?.config,
        (Some(m), _) if ouro_quant::mlx::read::is_mlx_dir(m) => ouro_quant::mlx::read::MlxDir::open(m)?.config,
        (Some(m), _) => ouro_quant::checkpoint::OuroConfig::from_file(m.join("config.json"))?,
        (None, Some(p)) => {
            let v = synth::preset_config(p, None);
            ouro_quant::checkpoint::OuroConfig::from_map(v.as_object().expect("object").clone(), std::path::Path::new("preset"))?
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let (budget, target, what) = match (&a.device, a.memory) {
        (Some(name), _) => {
            let all = plan::devices(a.devices.as_deref())?;
            let d = all.iter().find(|d| &d.name == name).ok_or_else(|| {
                anyhow::anyhow!("--device {name}: unknown (known: {})", all.iter().map(|d| d.name.clone()).collect::<Vec<_>>().join(", "))
            })?;
            (d.free(), d.kind, format!("{} ({}, {:?}): {} free of {}", d.name, d.description, d.kind, inspect::human_bytes(d.free()), inspect::human_bytes(d.memory)))
        }
        (None, Some(m)) => (m, a.kind, format!("{} budget ({:?})", inspect::human_bytes(m), a.kind)),
        (None, None) => unreachable!("clap requires one"),
    };
    let ctx = a.ctx.unwrap_or(PLAN_CTX.min(cfg.max_position_embeddings));
    anyhow::ensure!(
        ctx <= cfg.max_position_embeddings,
        "--ctx {ctx}: longer than the model's context of {} tokens (max_position_embeddings)",
        cfg.max_position_embeddings
    );
    if let Some(n) = a.loops.loops {
        // the full cache holds one slot per (loop, layer): N loops, N x layers slots
        cfg.total_ut_steps = n as usize;
    }
    let loops = cfg.total_ut_steps;
    let (kv, kv_dtype) = (a.kv, a.kv_dtype);
    let shared = kv == KvPolicy::SharedLast;
    let rows = plan::plan(&cfg, budget, ctx, shared, kv_dtype, target);
    let planned = match (&a.model, a.preset) {
        (Some(m), _) => m.display().to_string(),
        (None, Some(p)) => format!("preset {}", clap::ValueEnum::to_possible_value(&p).map(|v| v.get_name().to_string()).unwrap_or_default()),
        (None, None) => unreachable!("clap requires one"),
    };
    let limit = cfg.max_position_embeddings;
    let per_token = plan::kv_bytes_per_token(&cfg, shared, kv_dtype);
    if a.json {
        print_json(
            "ouro-quant-plan-1",
            &serde_json::json!({"model": planned, "max_position_embeddings": limit, "budget_bytes": budget, "kind": target, "ctx": ctx, "loops": loops, "kv": kv, "kv_dtype": kv_dtype, "kv_bytes_per_token": per_token, "formats": rows}),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("{planned} on {what}; context {ctx} tokens, {loops} loops, KV {kv:?} in {kv_dtype:?} ({} per token)", inspect::human_bytes(per_token as u64));
    println!("{:<16} {:>11} {:>11} {:>11} {:>11}  {:<5} {:>10}", "format", "weights", "KV", "runtime", "total", "fits", "max ctx");
    for r in &rows {
        // a max ctx at the model's position limit is that limit, not what memory allows
        let max_ctx = if r.max_ctx >= limit { format!("{limit} (model)") } else { r.max_ctx.to_string() };
        println!(
            "{:<16} {:>11} {:>11} {:>11} {:>11}  {:<5} {:>10}",
            r.format,
            inspect::human_bytes(r.weight_bytes),
            inspect::human_bytes(r.kv_bytes),
            inspect::human_bytes(r.overhead_bytes),
            inspect::human_bytes(r.total_bytes),
            if r.fits { "yes" } else { "NO" },
            max_ctx
        );
    }
    if target == Target::Cuda {
        println!("on CUDA: weights in GPU memory only (a GGUF embedding stays in host RAM; IQ4_NL is held as Q8_0, the other i-quants, F16 and MLX widened to f32: docs/runner.md)");
    }
    println!("max ctx: the longest context that fits in memory; \"(model)\": the model's position limit (max_position_embeddings) comes first");
    Ok(ExitCode::SUCCESS)
}
