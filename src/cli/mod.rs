//! The command line's shape: one `clap::Args` struct per command (each in its own module with the
//! code that turns it into a library call), the option groups several commands share, and the few
//! helpers every command prints or checks with. `main.rs` only parses and dispatches.
//!
//! One name and one default per idea, shared through one struct: [`KvArgs`] (`run`, `perplexity`),
//! [`EvalArgs`] (`validate`, `perplexity`), `--exit-threshold` (`run`, `perplexity`, `validate`),
//! `--json` on every command that prints a result, its object carrying a `schema` key.

pub mod batch;
pub mod convert;
pub mod imatrix;
pub mod inspect;
pub mod logits;
pub mod perplexity;
pub mod plan;
pub mod run;
pub mod synth;
pub mod validate;

use std::path::Path;
use std::process::ExitCode;

use candle_core::Device;
use clap::{Parser, Subcommand};
use ouro_quant::model::{KvPolicy, SkipFill};

/// The tokens per chunk `validate`, `perplexity` and `convert --validate` score with by default:
/// llama.cpp's `llama-perplexity` default, so that figures compare with its.
pub const EVAL_CTX: usize = 512;

#[derive(Parser)]
#[command(name = "ouro-quant", version, about = "Convert, validate and run Ouro looped language models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Describe an Ouro checkpoint, GGUF file or MLX directory: shapes, parameters, sizes per output
    /// format, optional scans and checksum verification.
    Inspect(inspect::Args),
    /// Convert an HF Ouro checkpoint to a quantized GGUF file (llama.cpp's `ouro` layout) or an MLX
    /// directory (mlx-lm's layout with our `ouro.py`).
    Convert(convert::Args),
    /// Write a random-weight checkpoint in the exact HF layout of the Ouro models.
    Synth(synth::Args),
    /// Generate text with a model, streaming it, and report speed, loops per token and memory.
    Run(run::Args),
    /// Compare a quantized model with its reference over a text: perplexity, KL divergence,
    /// per-loop quality and exit behaviour, with a pass/fail verdict (exit 0 pass, 1 fail, 2 error).
    Validate(validate::Args),
    /// Convert (and validate) every source x target of a manifest, resumably, with SHA256SUMS and a
    /// summary table (see formats/batch.md).
    Batch(batch::Args),
    /// Will it fit? Weights + KV cache + runtime for every output format against a device's memory.
    Plan(plan::Args),
    /// Perplexity of one model over a text as a decoder sees it: each chunk's first half prefilled,
    /// then token by token through the KV cache, all loops and then with adaptive exit at each
    /// --exit-threshold q (skipped loops really skipped, their KV slots filled per --kv): what early
    /// exit costs in quality and gains in speed.
    Perplexity(perplexity::Args),
    /// Compute an importance matrix from a calibration text (llama.cpp's imatrix GGUF or .dat
    /// layout), loop-aware, for `convert --imatrix` and llama-quantize.
    Imatrix(imatrix::Args),
    /// Write every loop's hidden state, logits, gate logits and exit pdf for a token sequence
    /// (the tensors of the golden expected.safetensors).
    Logits(logits::Args),
}

impl Command {
    /// Records every path the command reads, so that no output of it can be, contain, or lie
    /// inside one (`output::check_target`). Batch sources are added once the manifest is read.
    pub fn register_inputs(&self) {
        use ouro_quant::output::register_input as r;
        match self {
            Command::Convert(a) => {
                r(&a.model);
                a.validate.iter().for_each(r);
                a.imatrix.iter().for_each(r);
            }
            Command::Validate(a) => {
                r(&a.reference);
                r(&a.candidate);
                r(&a.eval.text);
                a.tasks.iter().for_each(r);
                a.reference_logits.iter().for_each(r);
            }
            Command::Batch(a) => r(&a.manifest),
            Command::Logits(a) => {
                r(&a.model);
                a.tokens_file.iter().for_each(r);
            }
            Command::Perplexity(a) => {
                r(&a.model);
                r(&a.eval.text);
            }
            Command::Run(a) => r(&a.model),
            Command::Imatrix(a) => {
                r(&a.model);
                r(&a.text);
            }
            Command::Inspect(a) => r(&a.path),
            Command::Plan(a) => a.model.iter().for_each(r),
            Command::Synth(_) => {}
        }
    }
}

/// How many loops a token runs (`run`, `perplexity`, `validate`, `logits`, `plan`).
#[derive(Clone, Copy, clap::Args)]
pub struct LoopsArg {
    /// Loops per token, 1 to 16, instead of the config's total_ut_steps (4 in the released
    /// models): upstream's computation with total_ut_steps = N, the exit distribution over N steps
    /// (the last takes the remaining mass). Beyond 4 the model extrapolates; the full KV cache
    /// holds N x layers slots.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=ouro_quant::model::MAX_LOOPS as i64))]
    pub loops: Option<u8>,
}

impl LoopsArg {
    /// Applies `--loops` to a loaded model.
    pub fn apply(&self, model: &mut ouro_quant::model::OuroModel) -> anyhow::Result<()> {
        match self.loops {
            Some(n) => model.set_loops(n as usize),
            None => Ok(()),
        }
    }
}

/// How the runner keeps keys and values (`run`, `perplexity`).
#[derive(Clone, Copy, clap::Args)]
pub struct KvArgs {
    /// KV cache: one per (loop, layer) as upstream, or one per layer with the last loop's K/V.
    #[arg(long, value_enum, default_value = "full")]
    pub kv: KvPolicy,
    /// With an exit threshold and the full cache: what the slots of loops a token skipped hold
    /// (compute: nothing until a later token runs that loop, which first runs it for the token,
    /// so every token reads out what a full pass gives at its exit loop; copy: its exit loop's
    /// K/V, fewer loops but approximate; mask: nothing; `ouro-quant perplexity` measures each).
    #[arg(long, value_enum, default_value = "compute")]
    pub kv_fill: SkipFill,
    /// Storage of the KV cache: f16 (the default everywhere, as in llama.cpp and mlx-lm: half the
    /// memory of f32, the same perplexity within 0.1%) or f32 (exact). `plan` also sizes q8_0,
    /// which this runner does not hold.
    #[arg(long, value_enum, default_value = "f16")]
    pub kv_dtype: RunKvDtype,
}

/// The KV storage the runner holds (the planner also sizes q8_0, which the runner cannot hold, so
/// it is not offered here).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunKvDtype {
    F32,
    F16,
}

impl KvArgs {
    pub fn dtype(&self) -> candle_core::DType {
        match self.kv_dtype {
            RunKvDtype::F32 => candle_core::DType::F32,
            RunKvDtype::F16 => candle_core::DType::F16,
        }
    }
}

/// What `validate` and `perplexity` score: a text, cut into chunks of `--ctx` tokens.
#[derive(Clone, clap::Args)]
pub struct EvalArgs {
    /// UTF-8 text to score (tokenized once; with `validate`, by the reference's tokenizer).
    #[arg(long)]
    pub text: std::path::PathBuf,
    /// Tokens per chunk; the second half of each chunk is scored. 512 by default, as
    /// llama-perplexity's, so that figures compare.
    #[arg(long, default_value_t = EVAL_CTX)]
    pub ctx: usize,
    /// Score at most this many chunks.
    #[arg(long)]
    pub chunks: Option<usize>,
}

impl EvalArgs {
    /// Refuses a context too short to score or longer than any of `models` was made for.
    pub fn check(&self, models: &[&Path]) -> anyhow::Result<()> {
        anyhow::ensure!(self.ctx >= 8, "--ctx {}: at least 8 tokens (the second half of each chunk is scored)", self.ctx);
        check_ctx("--ctx", self.ctx, models)
    }
}

/// Refuses an exit threshold outside [0, 1].
pub fn check_thresholds(qs: &[f32]) -> anyhow::Result<()> {
    for q in qs {
        anyhow::ensure!((0.0..=1.0).contains(q), "--exit-threshold {q}: must lie in [0, 1]");
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

/// Parses a size: plain bytes (`4600000000`), or a number with a unit: `K`, `M`, `G`, `T`
/// (powers of 1000, also `KB`...) or `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024, also `KiB`...).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let scale: u64 = match unit.strip_suffix(['B', 'b']).unwrap_or(unit).to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        "t" => 1_000_000_000_000,
        "ki" => 1 << 10,
        "mi" => 1 << 20,
        "gi" => 1 << 30,
        "ti" => 1 << 40,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (bytes, or K, M, G, T for powers of 1000, Ki, Mi, Gi, Ti for powers of 1024)")),
    };
    let bad = || format!("`{s}`: not a size (bytes, or a number with a unit such as 4.6G or 12GiB)");
    if num.is_empty() {
        return Err(bad());
    }
    if !num.contains('.') {
        return num.parse::<u64>().ok().and_then(|n| n.checked_mul(scale)).ok_or_else(bad);
    }
    let x: f64 = num.parse().map_err(|_| bad())?;
    let v = (x * scale as f64).round();
    if !(v.is_finite() && v >= 0.0 && v < u64::MAX as f64) {
        return Err(bad());
    }
    Ok(v as u64)
}

pub fn device(d: DeviceArg) -> anyhow::Result<Device> {
    Ok(match d {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda if !candle_core::utils::cuda_is_available() => {
            anyhow::bail!("--device cuda: this build has no CUDA support (build it with scripts/build-cuda.sh: docs/runner.md)")
        }
        DeviceArg::Metal if !candle_core::utils::metal_is_available() => {
            anyhow::bail!("--device metal: this build has no Metal support (build it with `cargo build --release --features metal` on macOS)")
        }
        DeviceArg::Cuda => Device::new_cuda(0).map_err(|e| {
            anyhow::anyhow!("--device cuda: no usable GPU: {} (needs an NVIDIA GPU and driver R580 or newer, CUDA 13)", first_line(&e))
        })?,
        DeviceArg::Metal => Device::new_metal(0).map_err(|e| anyhow::anyhow!("--device metal: no usable GPU: {}", first_line(&e)))?,
    })
}

/// The first line of an error (candle appends a backtrace where `RUST_BACKTRACE` is set).
fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Prints a command's result as JSON with its `schema` (name and version) as one more key; an
/// array result is an object's field in the command's own code, so every result is an object.
pub fn print_json(schema: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(value)?;
    match v.as_object_mut() {
        Some(o) => {
            o.insert("schema".into(), schema.into());
        }
        None => anyhow::bail!("internal: the {schema} result is not a JSON object"),
    }
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Writes `bytes` into a prepared output and moves it into place.
pub fn write_output(p: ouro_quant::output::PendingOutput, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(p.path(), bytes).map_err(|e| anyhow::anyhow!("{}: {e}", p.target().display()))?;
    p.commit()?;
    Ok(())
}

/// The context a model was trained for (max_position_embeddings; a GGUF's `ouro.context_length`),
/// read without loading the weights.
pub fn model_context(path: &Path) -> anyhow::Result<usize> {
    if path.is_file() {
        let g = ouro_quant::gguf::file::GgufFile::open(path)?;
        return match g.header.get("ouro.context_length") {
            Some(ouro_quant::gguf::file::Value::U32(n)) => Ok(*n as usize),
            _ => anyhow::bail!("{}: no UINT32 ouro.context_length", path.display()),
        };
    }
    let p = path.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", p.display()))?;
    v.get("max_position_embeddings")
        .and_then(|n| n.as_u64())
        .map(|n| n as usize)
        .ok_or_else(|| anyhow::anyhow!("{}: no integer max_position_embeddings", p.display()))
}

/// Refuses a context longer than any of `models` was made for (the positions past it would be
/// scored as if they were valid).
pub fn check_ctx(flag: &str, ctx: usize, models: &[&Path]) -> anyhow::Result<()> {
    for m in models {
        let limit = model_context(m)?;
        anyhow::ensure!(ctx <= limit, "{flag} {ctx}: longer than the context of {} ({limit} tokens, max_position_embeddings)", m.display());
    }
    Ok(())
}

/// The exit status of a command whose result is a check: 0 pass, 1 fail.
pub fn pass_fail(pass: bool) -> ExitCode {
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        use super::parse_size as p;
        assert_eq!(p("4600000000"), Ok(4_600_000_000));
        assert_eq!(p("4.6G"), Ok(4_600_000_000));
        assert_eq!(p("4.6GB"), Ok(4_600_000_000));
        assert_eq!(p("12GiB"), Ok(12 << 30));
        assert_eq!(p("1.5Mi"), Ok(1_572_864));
        assert_eq!(p("512k"), Ok(512_000));
        assert_eq!(p(" 7 B "), Ok(7));
        for bad in ["", "G", "4.6X", "4..6G", "-1G", "4.6GBB", "99999999999999999999T", "1e9"] {
            let e = p(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }

    /// Every option and argument of every command says what it does in `--help`.
    #[test]
    fn every_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() && !a.is_hide_set() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = vec![];
        walk(&super::Cli::command(), "ouro-quant", &mut missing);
        assert!(missing.is_empty(), "options without help: {missing:?}");
        super::Cli::command().debug_assert();
    }

    /// One name and one default per idea: every command that has an option of a given name gives
    /// it the same default, except where the name means another thing there, said in its help.
    #[test]
    fn one_default_per_option_name() {
        // (command, option): a different idea under the same name, and its help says which
        let other_idea = [
            ("plan", "device"),       // a device profile to plan for, not where to compute
            ("plan", "ctx"),          // the deployment context, not an evaluation chunk
            ("run", "exit-threshold"), // the one threshold to run with; the others study a list
        ];
        let mut seen: std::collections::BTreeMap<String, (String, Vec<String>)> = Default::default();
        let mut clash = vec![];
        for sub in super::Cli::command().get_subcommands() {
            for a in sub.get_arguments() {
                let Some(long) = a.get_long() else { continue };
                if other_idea.contains(&(sub.get_name(), long)) {
                    continue;
                }
                let default: Vec<String> = a.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
                match seen.get(long) {
                    Some((first, d)) if *d != default => clash.push(format!("--{long}: {first} {d:?}, {} {default:?}", sub.get_name())),
                    Some(_) => {}
                    None => {
                        seen.insert(long.to_string(), (sub.get_name().to_string(), default));
                    }
                }
            }
        }
        assert!(clash.is_empty(), "the same option with different defaults: {clash:?}");
    }
}
