//! The `ouro-quant` command line: argument parsing, dispatch and printing only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ouro_quant::progress::{Progress, Unit};

use candle_core::Device;
use ouro_quant::checkpoint::Checkpoint;
use ouro_quant::model::generate::{self, GenerateOptions, Sampling};
use ouro_quant::model::{dump, source, KvPolicy, SkipFill};
use ouro_quant::inspect::{self, parse_weight_dtype};
use ouro_quant::synth::{self, Preset, SynthOptions};

#[derive(Parser)]
#[command(name = "ouro-quant", version, about = "Convert, validate and run Ouro looped language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe an Ouro checkpoint: shapes, parameters, sizes per output format, optional scans.
    Inspect {
        /// HF checkpoint directory (config.json + model.safetensors or shards), or a GGUF file.
        path: PathBuf,
        /// List every tensor with dtype, shape, bytes and file.
        #[arg(long)]
        tensors: bool,
        /// Read every value and report NaN/Inf per tensor (non-zero exit if any).
        #[arg(long)]
        scan: bool,
        /// Check a GGUF file or an MLX directory written by ouro-quant against the checksums
        /// recorded in it (every tensor, the header, every file); exit 1 naming what differs.
        #[arg(long, conflicts_with_all = ["tensors", "scan"])]
        verify: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert an HF Ouro checkpoint to a quantized GGUF file (llama.cpp's `ouro` layout) or an MLX
    /// directory (mlx-lm's layout with our `ouro.py`).
    Convert {
        /// HF checkpoint directory.
        model: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "gguf")]
        format: Format,
        /// GGUF file type: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q3_K_M, Q4_0, IQ4_NL.
        #[arg(long = "type", default_value = "Q8_0")]
        file_type: String,
        /// MLX: bits of the affine quantization (2, 3, 4, 5, 6, 8; 16 keeps the source dtype).
        #[arg(long, default_value_t = 4)]
        bits: u32,
        /// MLX: values per scale/bias group (32, 64, 128).
        #[arg(long, default_value_t = 64)]
        group_size: usize,
        /// MLX: mixed-precision recipe as mlx-lm defines it (mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6).
        #[arg(long)]
        recipe: Option<String>,
        /// MLX: largest shard in bytes (mlx-lm: 5 GiB).
        #[arg(long, hide = true)]
        shard_bytes: Option<u64>,
        /// Validate the output against the source on this text and put the result in its model
        /// card: README.md's Validation section (MLX), or a card beside the file, X.md (GGUF).
        #[arg(long, value_name = "TEXT")]
        validate: Option<PathBuf>,
        /// Tokens per chunk for --validate.
        #[arg(long, default_value_t = 512)]
        validate_ctx: usize,
        /// Give tensors whose GGUF name matches REGEX this ggml type (repeatable), e.g. `attn_v=Q8_0`.
        #[arg(long = "type-override", value_name = "REGEX=TYPE")]
        type_override: Vec<String>,
        /// Output file (default: <model dir name>-<TYPE>.gguf in the current directory).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Print the type chosen for each tensor and the expected size, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replace an existing output.
        #[arg(long)]
        force: bool,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Write a random-weight checkpoint in the exact HF layout of the Ouro models.
    Synth {
        /// Model shapes.
        #[arg(long, value_enum)]
        preset: Preset,
        /// Physical layer count instead of the preset's.
        #[arg(long)]
        layers: Option<usize>,
        /// Random seed (same seed, same bytes).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weight dtype: bf16, f16 or f32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Split the weights into this many shards with an index.
        #[arg(long, default_value_t = 1)]
        shards: usize,
        /// Output directory (must not exist).
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
        /// Print a JSON summary.
        #[arg(long)]
        json: bool,
    },
    /// Generate text with a model, streaming it, and report speed, loops per token and memory.
    Run {
        /// Model: an HF checkpoint directory, a GGUF file or an MLX directory.
        model: PathBuf,
        /// Raw prompt text (no template).
        #[arg(long, conflicts_with_all = ["chat", "prompt_tokens"], required_unless_present_any = ["chat", "prompt_tokens"])]
        prompt: Option<String>,
        /// The prompt as token ids, comma separated (no tokenizer involved).
        #[arg(long, conflicts_with = "chat")]
        prompt_tokens: Option<String>,
        /// A user message, wrapped in the model's chat template.
        #[arg(long)]
        chat: Option<String>,
        /// Append `<think>\n` after the assistant header (Thinking models only think then).
        #[arg(long, requires = "chat")]
        thinking: bool,
        /// Generate at most this many tokens (generation also stops at a stop token and at the
        /// model's context).
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus sampling: sample among the most likely tokens whose probabilities add up to p
        /// (1 keeps every token).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// 0 keeps every token.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Seed of the sampler (the same seed, options and model give the same text).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop each token's loops once its exit CDF reaches q (saves compute; 1.0 runs all loops).
        #[arg(long)]
        exit_threshold: Option<f32>,
        #[command(flatten)]
        kv: KvArgs,
        /// Where to run: cpu, or cuda / metal in builds with that feature.
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceArg,
        /// Refuse to start if weights + KV for prompt + max-tokens would exceed this many bytes.
        #[arg(long)]
        max_memory: Option<u64>,
        /// Print the figures as JSON at the end (text still streams to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Compare a quantized model with its reference over a text: perplexity, KL divergence,
    /// per-loop quality and exit behaviour, with a pass/fail verdict (exit 0 pass, 1 fail, 2 error).
    Validate(ValidateArgs),
    /// Convert (and validate) every source x target of a manifest, resumably, with SHA256SUMS and a
    /// summary table (see formats/batch.md).
    Batch {
        /// The manifest (TOML).
        manifest: PathBuf,
        /// Conversions run at a time (within the manifest's memory budget).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// List the jobs and what would happen, convert nothing.
        #[arg(long)]
        dry_run: bool,
        /// Redo outputs that exist without a matching record.
        #[arg(long)]
        force: bool,
        /// Print the outcomes as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Will it fit? Weights + KV cache + runtime for every output format against a device's memory.
    Plan {
        /// A model (HF directory, GGUF file or MLX directory) whose config to plan for.
        #[arg(conflicts_with = "preset", required_unless_present = "preset")]
        model: Option<PathBuf>,
        /// Plan for a released model's shapes instead.
        #[arg(long, value_enum)]
        preset: Option<Preset>,
        /// A device profile (formats/devices.toml, or --devices): its free memory is the budget.
        #[arg(long, conflicts_with = "memory", required_unless_present = "memory")]
        device: Option<String>,
        /// The budget in bytes.
        #[arg(long)]
        memory: Option<u64>,
        /// Context length to plan for (tokens in the KV cache); default 4096, or the model's
        /// context where that is shorter.
        #[arg(long)]
        ctx: Option<usize>,
        /// KV cache: full (one slot per loop and layer, as upstream) or shared-last (one per layer).
        #[arg(long, value_enum, default_value = "full")]
        kv: KvPolicy,
        /// KV-cache storage: f16 (llama.cpp's and MLX's default), f32 (this runner), q8_0.
        #[arg(long, value_enum, default_value = "f16")]
        kv_dtype: ouro_quant::plan::KvDtype,
        /// More device profiles (TOML, same form as formats/devices.toml).
        #[arg(long)]
        devices: Option<PathBuf>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of one model over a text as a decoder sees it: each chunk's first half prefilled,
    /// then token by token through the KV cache, all loops and then with adaptive exit at each
    /// --exit-threshold q (skipped loops really skipped, their KV slots filled per --kv): what early
    /// exit costs in quality and gains in speed.
    Perplexity {
        /// Model: an HF checkpoint directory, a GGUF file or an MLX directory.
        model: PathBuf,
        /// UTF-8 text to score.
        #[arg(long)]
        text: PathBuf,
        /// Tokens per chunk (the first half prefilled, the second half scored token by token).
        #[arg(long, default_value_t = 128)]
        ctx: usize,
        /// Score at most this many chunks.
        #[arg(long)]
        chunks: Option<usize>,
        /// Exit thresholds to compare with all loops, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "0.5")]
        exit_threshold: Vec<f32>,
        #[command(flatten)]
        kv: KvArgs,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write every loop's hidden state, logits, gate logits and exit pdf for a token sequence
    /// (the tensors of the golden expected.safetensors).
    Logits {
        /// Model: an HF checkpoint directory, a GGUF file or an MLX directory.
        model: PathBuf,
        /// Token ids, comma separated.
        #[arg(long, conflicts_with = "tokens_file", required_unless_present = "tokens_file")]
        tokens: Option<String>,
        /// File of token ids separated by commas or whitespace.
        #[arg(long)]
        tokens_file: Option<PathBuf>,
        /// The safetensors file to write.
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Replace an existing output that ouro-quant wrote (never an input or another file).
        #[arg(long)]
        force: bool,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How the runner keeps keys and values (`run`, `perplexity`).
#[derive(Clone, Copy, clap::Args)]
struct KvArgs {
    /// KV cache: one per (loop, layer) as upstream, or one per layer with the last loop's K/V.
    #[arg(long, value_enum, default_value = "full")]
    kv: KvPolicy,
    /// With an exit threshold and the full cache: what the slots of loops a token skipped hold
    /// (its exit loop's K/V, or nothing; `ouro-quant perplexity` measures both).
    #[arg(long, value_enum, default_value = "copy")]
    kv_fill: SkipFill,
    /// Storage of the KV cache: f32 (the default: exact, and fastest to attend over on the CPU) or
    /// f16 (half the memory, perplexity within 0.1%; `plan` sizes both, and llama.cpp's q8_0).
    #[arg(long, value_enum, default_value = "f32")]
    kv_dtype: RunKvDtype,
}

/// The KV storage the runner holds (the planner also sizes q8_0, which the runner cannot hold, so
/// it is not offered here).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RunKvDtype {
    F32,
    F16,
}

impl KvArgs {
    fn dtype(&self) -> anyhow::Result<candle_core::DType> {
        Ok(match self.kv_dtype {
            RunKvDtype::F32 => candle_core::DType::F32,
            RunKvDtype::F16 => candle_core::DType::F16,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Gguf,
    Mlx,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

fn device(d: DeviceArg) -> anyhow::Result<Device> {
    Ok(match d {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::new_cuda(0)
            .map_err(|e| anyhow::anyhow!("--device cuda: {e} (build with `--features cuda`)"))?,
        DeviceArg::Metal => Device::new_metal(0)
            .map_err(|e| anyhow::anyhow!("--device metal: {e} (build with `--features metal`)"))?,
    })
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Err(e) = check_format_options(&matches) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    ouro_quant::output::install_signal_cleanup();
    register_inputs(&cli.command);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints a command's result as JSON with its `schema` (name and version) as one more key; an
/// array result is an object's field in the command's own code, so every result is an object.
fn print_json(schema: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
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

/// Refuses options of the other output format given on the command line (`convert --format mlx
/// --type Q4_K_M` would otherwise write MLX 4-bit and ignore the type).
fn check_format_options(matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let Some(("convert", m)) = matches.subcommand() else {
        return Ok(());
    };
    let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    let mlx = matches!(m.get_one::<Format>("format"), Some(Format::Mlx));
    let (_, wrong): (&str, &[(&str, &str)]) = if mlx {
        ("", &[("file_type", "--type"), ("type_override", "--type-override")])
    } else {
        ("", &[("bits", "--bits"), ("group_size", "--group-size"), ("recipe", "--recipe")])
    };
    if let Some((_, flag)) = wrong.iter().find(|(id, _)| given(id)) {
        anyhow::bail!(
            "{flag} is {} option, and this conversion writes {}: {}",
            if mlx { "a GGUF" } else { "an MLX" },
            if mlx { "MLX" } else { "GGUF" },
            if mlx {
                "choose MLX's precision with --bits/--group-size/--recipe, or write GGUF with --format gguf"
            } else {
                "add --format mlx to write an MLX directory, or choose a GGUF type with --type"
            }
        );
    }
    Ok(())
}

/// Records every path a command reads, so that no output of it can be, contain, or lie inside one
/// (`output::check_target`). Batch sources are added once the manifest is read.
fn register_inputs(cmd: &Command) {
    use ouro_quant::output::register_input as r;
    match cmd {
        Command::Convert { model, validate, .. } => {
            r(model);
            validate.iter().for_each(r);
        }
        Command::Validate(a) => {
            r(&a.reference);
            r(&a.candidate);
            r(&a.text);
            a.reference_logits.iter().for_each(r);
        }
        Command::Batch { manifest, .. } => r(manifest),
        Command::Logits { model, tokens_file, .. } => {
            r(model);
            tokens_file.iter().for_each(r);
        }
        _ => {}
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Inspect {
            path,
            tensors,
            scan,
            verify,
            json,
        } => {
            if verify {
                let r = ouro_quant::verify::verify(&path)?;
                if json {
                    print_json("ouro-quant-verify-1", &r)?;
                } else {
                    print!("{}", r.render());
                }
                return Ok(if r.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) });
            }
            if path.is_file() {
                anyhow::ensure!(!scan, "--scan reads checkpoints; a GGUF file is checked by its reader");
                let r = inspect::inspect_gguf(&path, tensors)?;
                if json {
                    print_json("ouro-quant-inspect-gguf-1", &r)?;
                } else {
                    print!("{}", inspect::render_gguf(&r));
                }
                return Ok(ExitCode::SUCCESS);
            }
            if ouro_quant::mlx::read::is_mlx_dir(&path) {
                anyhow::ensure!(!scan && !tensors, "--scan and --tensors read HF checkpoints; an MLX directory is described as a whole (--verify checks its files)");
                let r = inspect::inspect_mlx(&path)?;
                if json {
                    print_json("ouro-quant-inspect-mlx-1", &r)?;
                } else {
                    print!("{}", inspect::render_mlx(&r));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let ck = Checkpoint::open(&path)?;
            let report = inspect::inspect(&ck, tensors, scan);
            if json {
                print_json("ouro-quant-inspect-1", &report)?;
            } else {
                print!("{}", inspect::render(&report));
            }
            let bad = report.scan.as_ref().is_some_and(|s| !s.bad.is_empty());
            Ok(if bad { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Command::Synth {
            preset,
            layers,
            seed,
            dtype,
            shards,
            output,
            force,
            json,
        } => {
            let dtype = parse_weight_dtype(&dtype)
                .ok_or_else(|| anyhow::anyhow!("--dtype {dtype}: expected bf16, f16 or f32"))?;
            let opts = SynthOptions {
                preset,
                layers,
                seed,
                dtype,
                shards,
            };
            let bar = Progress::new("synth", Unit::Bytes, json);
            let start = Instant::now();
            let dir = synth::synth(&opts, &output, force, &|done, total| bar.update(done, total, ""))?;
            bar.finish();
            let ck = Checkpoint::open(&dir)?;
            let secs = start.elapsed().as_secs_f64();
            let params = ck.config.parameter_count();
            let bytes = ck.weights.bytes_on_disk();
            if json {
                print_json("ouro-quant-synth-1", &serde_json::json!({"path": dir, "parameters": params, "bytes": bytes, "seconds": secs}))?;
            } else {
                println!(
                    "wrote {}: {} parameters, {} in {:.1} s",
                    dir.display(),
                    inspect::group_digits(params),
                    inspect::human_bytes(bytes),
                    secs
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert {
            model,
            format: Format::Gguf,
            file_type,
            type_override,
            output,
            dry_run,
            force,
            json,
            validate,
            validate_ctx,
            ..
        } => {
            if let (Some(text), false) = (&validate, dry_run) {
                check_validation_text(&model, text, validate_ctx)?;
                if let Some(o) = &output {
                    // the card beside the file is written after the validation: checked now
                    ouro_quant::output::check_target(&ouro_quant::gguf::card::card_path(o), true, false)?;
                }
            }
            let out = convert_gguf(model.clone(), &file_type, &type_override, output, dry_run, force, json)?;
            match (validate, out) {
                (Some(text), Some(out)) => validate_into_card(&model, &out, &text, validate_ctx),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Convert {
            model,
            format: Format::Mlx,
            bits,
            group_size,
            recipe,
            shard_bytes,
            output,
            dry_run,
            force,
            json,
            validate,
            validate_ctx,
            ..
        } => {
            if let (Some(text), false) = (&validate, dry_run) {
                check_validation_text(&model, text, validate_ctx)?;
            }
            let code = convert_mlx(model.clone(), bits, group_size, recipe, shard_bytes, output.clone(), dry_run, force, json)?;
            match (validate, output) {
                (Some(text), Some(out)) if !dry_run => validate_into_card(&model, &out, &text, validate_ctx),
                (Some(_), None) => anyhow::bail!("--validate needs -o (the directory whose card gets the result)"),
                _ => Ok(code),
            }
        }
        Command::Validate(args) => validate_cmd(args),
        Command::Batch { manifest, jobs, dry_run, force, json } => {
            use ouro_quant::batch;
            let m = batch::read_manifest(&manifest)?;
            for j in batch::jobs(&m) {
                ouro_quant::output::register_input(&j.source_path);
            }
            if let Some(v) = &m.validate {
                ouro_quant::output::register_input(&v.text);
            }
            if dry_run {
                let list = batch::jobs(&m);
                if json {
                    print_json("ouro-quant-batch-plan-1", &serde_json::json!({"jobs": list}))?;
                } else {
                    for j in &list {
                        let exists = m.output_dir.join(&j.output).exists();
                        println!("{:<32} from {:<16} {:<40} {}{}", j.output, j.source, j.options, if exists { "exists" } else { "to convert" }, if j.validate { ", validate" } else { "" });
                    }
                    println!("{} jobs into {}", list.len(), m.output_dir.display());
                }
                return Ok(ExitCode::SUCCESS);
            }
            let n = batch::jobs(&m).len();
            let multi = indicatif::MultiProgress::new();
            if json {
                multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let overall = multi.add(ProgressBar::new(n as u64).with_style(ProgressStyle::with_template("batch {bar:30} {pos}/{len} jobs {elapsed}").expect("template")));
            let bars: std::sync::Mutex<std::collections::BTreeMap<usize, ProgressBar>> = Default::default();
            // off a terminal, plain periodic lines per job (the bars above draw only on one)
            let plain: std::sync::Mutex<std::collections::BTreeMap<usize, Progress>> = Default::default();
            let style = ProgressStyle::with_template("{prefix:<28} {bar:30} {binary_bytes}/{binary_total_bytes} {msg}").expect("template");
            let started = |i: usize, j: &batch::Job| {
                let b = multi.insert_before(&overall, ProgressBar::new(0).with_style(style.clone()).with_prefix(j.output.clone()));
                bars.lock().expect("lock").insert(i, b);
                plain.lock().expect("lock").insert(i, Progress::new(&format!("batch {}", j.output), Unit::Bytes, true));
            };
            let progress = |i: usize, d: u64, t: u64, what: &str| {
                if let Some(b) = bars.lock().expect("lock").get(&i) {
                    b.set_length(t);
                    b.set_position(d);
                    b.set_message(what.to_string());
                }
                if let Some(p) = plain.lock().expect("lock").get(&i) {
                    p.update(d, t, what);
                }
            };
            let finished = |i: usize, o: &batch::Outcome| {
                if let Some(b) = bars.lock().expect("lock").remove(&i) {
                    b.finish_and_clear();
                }
                overall.inc(1);
                if !json {
                    let _ = multi.println(format!("{:<9} {}{}", o.status, o.output, o.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()));
                }
            };
            let outcomes = batch::run(&m, jobs, force, &progress, &started, &finished)?;
            overall.finish_and_clear();
            let failed = outcomes.iter().filter(|o| o.status == "failed").count();
            if json {
                print_json("ouro-quant-batch-1", &serde_json::json!({"outcomes": outcomes}))?;
            } else {
                print!("{}", std::fs::read_to_string(m.output_dir.join("summary.md")).unwrap_or_default());
                println!(
                    "{} converted, {} skipped, {failed} failed; SHA256SUMS, summary.md and summary.json in {}",
                    outcomes.iter().filter(|o| o.status == "converted").count(),
                    outcomes.iter().filter(|o| o.status == "skipped").count(),
                    m.output_dir.display()
                );
            }
            Ok(if failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Command::Plan {
            model,
            preset,
            device,
            memory,
            ctx,
            kv,
            kv_dtype,
            devices,
            json,
        } => {
            use ouro_quant::plan;
            let cfg = match (&model, preset) {
                (Some(m), _) if m.is_file() => source::GgufSource::open(m)?.config,
                (Some(m), _) if ouro_quant::mlx::read::is_mlx_dir(m) => ouro_quant::mlx::read::MlxDir::open(m)?.config,
                (Some(m), _) => ouro_quant::checkpoint::OuroConfig::from_file(m.join("config.json"))?,
                (None, Some(p)) => {
                    let v = synth::preset_config(p, None);
                    ouro_quant::checkpoint::OuroConfig::from_map(v.as_object().expect("object").clone(), std::path::Path::new("preset"))?
                }
                (None, None) => unreachable!("clap requires one"),
            };
            let (budget, what) = match (&device, memory) {
                (Some(name), _) => {
                    let all = plan::devices(devices.as_deref())?;
                    let d = all.iter().find(|d| &d.name == name).ok_or_else(|| {
                        anyhow::anyhow!("--device {name}: unknown (known: {})", all.iter().map(|d| d.name.clone()).collect::<Vec<_>>().join(", "))
                    })?;
                    (d.free(), format!("{} ({}): {} free of {}", d.name, d.description, inspect::human_bytes(d.free()), inspect::human_bytes(d.memory)))
                }
                (None, Some(m)) => (m, format!("{} budget", inspect::human_bytes(m))),
                (None, None) => unreachable!("clap requires one"),
            };
            let ctx = ctx.unwrap_or(4096.min(cfg.max_position_embeddings));
            anyhow::ensure!(
                ctx <= cfg.max_position_embeddings,
                "--ctx {ctx}: longer than the model's context of {} tokens (max_position_embeddings)",
                cfg.max_position_embeddings
            );
            let shared = kv == KvPolicy::SharedLast;
            let rows = plan::plan(&cfg, budget, ctx, shared, kv_dtype);
            let planned = match (&model, preset) {
                (Some(m), _) => m.display().to_string(),
                (None, Some(p)) => format!("preset {}", clap::ValueEnum::to_possible_value(&p).map(|v| v.get_name().to_string()).unwrap_or_default()),
                (None, None) => unreachable!("clap requires one"),
            };
            let limit = cfg.max_position_embeddings;
            if json {
                print_json(
                    "ouro-quant-plan-1",
                    &serde_json::json!({"model": planned, "max_position_embeddings": limit, "budget_bytes": budget, "ctx": ctx, "kv": kv, "kv_dtype": kv_dtype, "kv_bytes_per_token": plan::kv_bytes_per_token(&cfg, shared, kv_dtype), "formats": rows}),
                )?;
            } else {
                println!("{planned} on {what}; context {ctx} tokens, KV {:?} in {:?} ({} per token)", kv, kv_dtype, inspect::human_bytes(plan::kv_bytes_per_token(&cfg, shared, kv_dtype) as u64));
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
                println!("max ctx: the longest context that fits in memory; \"(model)\": the model's position limit (max_position_embeddings) comes first");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Perplexity { model, text, ctx, chunks, exit_threshold, kv, json } => {
            perplexity_cmd(&model, &text, ctx, chunks, &exit_threshold, kv, json)
        }
        Command::Logits {
            model,
            tokens,
            tokens_file,
            output,
            force,
            json,
        } => {
            let text = match (tokens, tokens_file) {
                (Some(t), _) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
                (None, None) => unreachable!("clap requires one"),
            };
            let ids = dump::parse_token_list(&text)?;
            ouro_quant::output::check_target(&output, force, false)?;
            let limit = model_context(&model)?;
            anyhow::ensure!(ids.len() <= limit, "{} tokens: more than the model's context of {limit} (max_position_embeddings)", ids.len());
            let loaded = source::load(&model, &Device::Cpu)?;
            let path = dump::write_logits(&loaded.model, &ids, &output, force)?;
            if json {
                print_json("ouro-quant-logits-1", &serde_json::json!({"path": path, "tokens": ids.len(), "loops": loaded.model.dims.loops}))?;
            } else {
                println!("wrote {} ({} tokens, {} loops)", path.display(), ids.len(), loaded.model.dims.loops);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            model,
            prompt,
            prompt_tokens,
            chat,
            thinking,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            exit_threshold,
            kv,
            device: dev,
            max_memory,
            json,
        } => run_model(RunArgs {
            model,
            prompt,
            prompt_tokens,
            chat,
            thinking,
            max_tokens,
            sampling: Sampling {
                temperature,
                top_k,
                top_p,
                seed,
            },
            exit_threshold,
            kv,
            dev,
            max_memory,
            json,
        }),
    }
}

fn perplexity_cmd(
    model: &std::path::Path,
    text: &std::path::Path,
    ctx: usize,
    chunks: Option<usize>,
    thresholds: &[f32],
    kv_args: KvArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let KvArgs { kv, kv_fill, .. } = kv_args;
    let kv_dtype = kv_args.dtype()?;
    for q in thresholds {
        anyhow::ensure!((0.0..=1.0).contains(q), "--exit-threshold: {q} is not in [0, 1]");
    }
    anyhow::ensure!(ctx >= 8, "--ctx {ctx}: at least 8 tokens (the second half of each chunk is scored)");
    check_ctx("--ctx", ctx, &[model])?;
    let body = std::fs::read_to_string(text).map_err(|e| anyhow::anyhow!("{}: {e}", text.display()))?;
    let loaded = source::load(model, &Device::Cpu)?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{}: no tokenizer.json to tokenize the text with", model.display()))?;
    let ids = tok.encode(body.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", text.display()))?.get_ids().to_vec();
    let spans = ouro_quant::eval::scored_chunks(ids.len(), ctx, chunks).map_err(|e| anyhow::anyhow!("{}: {e}", text.display()))?;
    let m = &loaded.model;
    // every threshold in turn on each chunk: speeds compared moments apart, chunk by chunk
    let qs: Vec<Option<f32>> = std::iter::once(None).chain(thresholds.iter().map(|&q| Some(q))).collect();
    let runs = ouro_quant::eval::decode_evals(m, &ids, ctx, chunks, &qs, kv, kv_fill, kv_dtype)?;
    let base = runs[0].clone();
    if json {
        let v = serde_json::json!({
            "model": loaded.description,
            "text": text.display().to_string(),
            "ctx": ctx,
            "chunks": spans.len(),
            "runs": runs,
            "ppl_rise_pct": runs.iter().map(|r| 100.0 * (r.ppl / base.ppl - 1.0)).collect::<Vec<_>>(),
            "speedup": runs.iter().map(|r| r.speedup_over(&base)).collect::<Vec<_>>(),
        });
        print_json("ouro-quant-perplexity-1", &v)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: {} chunks of {ctx}, {} decoded tokens scored, KV {kv:?} in {kv_dtype:?} (skipped loops: {kv_fill:?})", loaded.description, spans.len(), base.scored_tokens);
    println!("{:<10} {:>16} {:>9} {:>12} {:>12} {:>9}", "exit", "perplexity", "change", "loops/token", "decode tok/s", "speed-up");
    for r in &runs {
        println!(
            "{:<10} {:>9.4} ± {:<5.4} {:>+8.2}% {:>12.2} {:>12.1} {:>8.2}x",
            r.exit_threshold.map_or("all loops".to_string(), |q| format!("q = {q}")),
            r.ppl,
            r.ppl_se,
            100.0 * (r.ppl / base.ppl - 1.0),
            r.mean_loops_per_token,
            r.decode_tokens_per_s,
            r.speedup_over(&base)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Converts to GGUF; returns the path written (`None` for a dry run).
fn convert_gguf(
    model: PathBuf,
    file_type: &str,
    overrides: &[String],
    output: Option<PathBuf>,
    dry_run: bool,
    force: bool,
    json: bool,
) -> anyhow::Result<Option<PathBuf>> {
    use ouro_quant::convert::{self, GgufOptions};
    use ouro_quant::gguf::mix::{FileType, TypeOverride};
    use ouro_quant::quant::ggml::GgmlType;
    let ft = FileType::from_name(file_type).ok_or_else(|| {
        anyhow::anyhow!(
            "--type {file_type}: unknown GGUF type (one of {})",
            FileType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
        )
    })?;
    let overrides = overrides
        .iter()
        .map(|o| {
            let (re, ty) = o
                .rsplit_once('=')
                .ok_or_else(|| anyhow::anyhow!("--type-override {o}: expected REGEX=TYPE"))?;
            let ty = GgmlType::from_name(ty).ok_or_else(|| anyhow::anyhow!("--type-override {o}: unknown ggml type `{ty}`"))?;
            let pattern = regex::Regex::new(re).map_err(|e| anyhow::anyhow!("--type-override {o}: {e}"))?;
            Ok(TypeOverride { pattern, ty })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ck = Checkpoint::open(&model)?;
    for w in &ck.warnings {
        eprintln!("note: {}: {w}", model.display());
    }
    let opts = GgufOptions { file_type: ft, overrides, force };
    if dry_run {
        let plan = convert::plan_gguf(&ck, &opts)?;
        let mut total = 0u64;
        for p in &plan {
            let cols = *p.shape.last().unwrap_or(&1);
            let bytes = (p.shape.iter().product::<usize>() / cols * p.ggml_type.row_bytes(cols)) as u64;
            total += bytes;
            if !json {
                println!("{:<28} {:<7} {:<16} {:>12}", p.gguf_name, p.ggml_type.name(), format!("{:?}", p.shape), inspect::human_bytes(bytes));
            }
        }
        let file_bytes = convert::gguf_file_bytes(&ck, &opts)?;
        if json {
            print_json("ouro-quant-convert-plan-1", &serde_json::json!({"file_type": ft.name(), "tensor_bytes": total, "file_bytes": file_bytes, "tensors": plan}))?;
        } else {
            println!("{} tensors, {} of tensor data, {} file ({file_bytes} bytes)", plan.len(), inspect::human_bytes(total), inspect::human_bytes(file_bytes));
        }
        return Ok(None);
    }
    let out = output.unwrap_or_else(|| PathBuf::from(format!("{}-{}.gguf", ck.folder_name(), ft.name())));
    let bar = Progress::new("convert", Unit::Bytes, json);
    let summary = convert::convert_gguf(&ck, &opts, &out, &|done, total, name| bar.update(done, total, name))?;
    bar.finish();
    if json {
        print_json("ouro-quant-convert-1", &summary)?;
    } else {
        println!(
            "wrote {} ({}, {:.2} bits/weight, {} tensors: {}) in {:.1} s ({:.2} GB/s of input)",
            summary.output.display(),
            inspect::human_bytes(summary.bytes),
            summary.bits_per_weight,
            summary.tensors,
            summary.types.iter().map(|(t, n)| format!("{n} {t}")).collect::<Vec<_>>().join(", "),
            summary.seconds,
            summary.input_gb_per_s
        );
    }
    Ok(Some(out))
}

/// The context a model was trained for (max_position_embeddings; a GGUF's `ouro.context_length`),
/// read without loading the weights.
fn model_context(path: &std::path::Path) -> anyhow::Result<usize> {
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
fn check_ctx(flag: &str, ctx: usize, models: &[&std::path::Path]) -> anyhow::Result<()> {
    for m in models {
        let limit = model_context(m)?;
        anyhow::ensure!(
            ctx <= limit,
            "{flag} {ctx}: longer than the context of {} ({limit} tokens, max_position_embeddings)",
            m.display()
        );
    }
    Ok(())
}

/// Checks, before a conversion starts, that `--validate TEXT` can be honoured afterwards: the text
/// reads and tokenizes (with the source's tokenizer) to at least one chunk of `ctx` tokens.
fn check_validation_text(model: &std::path::Path, text: &std::path::Path, ctx: usize) -> anyhow::Result<()> {
    let t = std::fs::read_to_string(text).map_err(|e| anyhow::anyhow!("--validate {}: {e}", text.display()))?;
    check_ctx("--validate-ctx", ctx, &[model])?;
    let tok = source::load_tokenizer(model)?;
    let n = tok.encode(t.as_str(), false).map_err(|e| anyhow::anyhow!("--validate {}: tokenizing: {e}", text.display()))?.get_ids().len();
    anyhow::ensure!(
        n >= ctx,
        "--validate {}: {n} tokens, fewer than one chunk of --validate-ctx {ctx}: nothing would be scored",
        text.display()
    );
    Ok(())
}

/// Validates a conversion against its source and puts the Markdown summary in its model card: the
/// Validation section of an MLX directory's README.md, or a new card beside a GGUF file (X.md).
fn validate_into_card(source: &std::path::Path, out: &std::path::Path, text: &std::path::Path, ctx: usize) -> anyhow::Result<ExitCode> {
    use ouro_quant::eval::validate::{self, ReferenceSource, ValidateOptions};
    use ouro_quant::eval::verdict;
    let t = std::fs::read_to_string(text).map_err(|e| anyhow::anyhow!("{}: {e}", text.display()))?;
    let tok = source::load_tokenizer(source)?;
    let tokens = tok.encode(t.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
    let reference = source::load(source, &Device::Cpu)?;
    let candidate = source::load(out, &Device::Cpu)?;
    let opts = ValidateOptions { ctx, chunks: None, thresholds: vec![0.5, 0.7, 0.9, 1.0] };
    let src = ReferenceSource::Model { model: &reference.model, hash: validate::model_hash(source)?, save: None };
    let r = validate::validate(src, &source.display().to_string(), &candidate.model, &out.display().to_string(), &tokens, &text.display().to_string(), &opts, &|_, _| {})?;
    let profile = verdict::profile(verdict::family_of(out)?).expect("shipped profile");
    let checks = verdict::verdict(&r, &profile);
    let md = verdict::render_markdown(&r, &checks, &profile);
    verdict::write_card(out, &md)?;
    print!("{}", verdict::render_table(&r, &checks, &profile));
    Ok(if checks.iter().all(|c| c.pass) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The progress bar of a conversion (hidden with `--json`).

#[allow(clippy::too_many_arguments)]
fn convert_mlx(
    model: PathBuf,
    bits: u32,
    group_size: usize,
    recipe: Option<String>,
    shard_bytes: Option<u64>,
    output: Option<PathBuf>,
    dry_run: bool,
    force: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use ouro_quant::mlx::{write, MlxOptions, Recipe};
    let recipe = recipe
        .map(|r| {
            Recipe::from_name(&r).ok_or_else(|| {
                anyhow::anyhow!("--recipe {r}: unknown (one of {})", Recipe::ALL.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "))
            })
        })
        .transpose()?;
    let bits = if bits == 16 { None } else { Some(bits) };
    let mut opts = MlxOptions::new(bits, group_size, recipe, force)?;
    if let Some(b) = shard_bytes {
        opts.shard_bytes = b;
    }
    let ck = Checkpoint::open(&model)?;
    for w in &ck.warnings {
        eprintln!("note: {}: {w}", model.display());
    }
    if dry_run {
        let plan = write::plan_mlx(&ck, &opts)?;
        let mut total = 0u64;
        for p in &plan {
            let bytes: u64 = p.outputs().iter().map(|s| s.nbytes() as u64).sum();
            total += bytes;
            if !json {
                let how = match p.quant {
                    Some((b, g)) => format!("{b}-bit gs{g}"),
                    None => p.dtype.name().to_string(),
                };
                println!("{:<48} {:<11} {:<16} {:>12}", p.hf_name, how, format!("{:?}", p.shape), inspect::human_bytes(bytes));
            }
        }
        if json {
            print_json("ouro-quant-convert-plan-1", &serde_json::json!({"tensor_bytes": total, "tensors": plan, "quantization": write::quantization_config(&plan, &opts)}))?;
        } else {
            println!("{} tensors, {} of tensor data", plan.len(), inspect::human_bytes(total));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let out = output.unwrap_or_else(|| PathBuf::from(write::default_output_name(&ck, &opts)));
    let bar = Progress::new("convert", Unit::Bytes, json);
    let summary = write::convert_mlx(&ck, &opts, &out, &|done, total, name| bar.update(done, total, name))?;
    bar.finish();
    if json {
        print_json("ouro-quant-convert-1", &summary)?;
    } else {
        println!(
            "wrote {} ({}, {:.2} bits/weight, {} quantized and {} float tensors, {} shard(s)) in {:.1} s ({:.2} GB/s of input)",
            summary.output.display(),
            inspect::human_bytes(summary.bytes),
            summary.bits_per_weight,
            summary.quantized_tensors,
            summary.float_tensors,
            summary.shards,
            summary.seconds,
            summary.input_gb_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
struct ValidateArgs {
        /// The reference: an HF checkpoint directory (or any model `run` reads).
        #[arg(long)]
        reference: PathBuf,
        /// The candidate: a GGUF file, an MLX directory or an HF directory.
        #[arg(long)]
        candidate: PathBuf,
        /// Text to evaluate on (tokenized once with the reference's tokenizer).
        #[arg(long)]
        text: PathBuf,
        /// Tokens per chunk; the second half of each chunk is scored.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// At most this many chunks.
        #[arg(long)]
        chunks: Option<usize>,
        /// Exit thresholds q to study, comma separated (0.5 is always included: the verdict uses
        /// it). The same option as run's and perplexity's --exit-threshold (`--thresholds` is
        /// still accepted).
        #[arg(long = "exit-threshold", alias = "thresholds", value_delimiter = ',', default_value = "0.5,0.7,0.9,1.0")]
        thresholds: Vec<f32>,
        /// Verdict profile: float, 8bit, 6bit, 4bit, 3bit (default: from the candidate's type).
        #[arg(long)]
        profile: Option<String>,
        /// Override the profile's limit on the default-mode perplexity ratio.
        #[arg(long)]
        max_ppl_ratio: Option<f64>,
        /// Override the profile's minimum exit agreement at q = 0.5 (percent).
        #[arg(long)]
        min_exit_agreement: Option<f64>,
        /// Override the profile's minimum same-top-token share (percent).
        #[arg(long)]
        min_same_top: Option<f64>,
        /// Write the report as JSON (schema in formats/validate-report.md).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Write a Markdown summary (for model cards).
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Write a plot (SVG or PNG, by the file's extension): exit-loop histograms per q and
        /// per-loop perplexity.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Store the reference's outputs so that other candidates skip the reference run.
        #[arg(long, conflicts_with = "reference_logits")]
        save_reference: Option<PathBuf>,
        /// Use stored reference outputs instead of running the reference.
        #[arg(long)]
        reference_logits: Option<PathBuf>,
        /// Print the report JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Replace existing --report/--markdown/--plot/--save-reference files (only regular files
        /// that are none of the inputs).
        #[arg(long)]
        force: bool,
}

/// Writes `bytes` into a prepared output and moves it into place.
fn write_output(p: ouro_quant::output::PendingOutput, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(p.path(), bytes).map_err(|e| anyhow::anyhow!("{}: {e}", p.target().display()))?;
    p.commit()?;
    Ok(())
}

fn validate_cmd(a: ValidateArgs) -> anyhow::Result<ExitCode> {
    use ouro_quant::eval::validate::{self, ReferenceSource, ValidateOptions};
    use ouro_quant::eval::verdict;
    for q in &a.thresholds {
        anyhow::ensure!((0.0..=1.0).contains(q), "--exit-threshold: {q} is not in [0, 1]");
    }
    anyhow::ensure!(a.ctx >= 8, "--ctx {}: at least 8 tokens (the second half of each chunk is scored)", a.ctx);
    if let Some(p) = &a.plot {
        anyhow::ensure!(
            p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg") || e.eq_ignore_ascii_case("png")),
            "--plot {}: name the file .svg or .png",
            p.display()
        );
    }
    let mut thresholds = a.thresholds.clone();
    if !thresholds.iter().any(|q| (q - 0.5).abs() < 1e-6) {
        thresholds.insert(0, 0.5);
    }
    // The profile first, so that a bad name fails before any work.
    let family = match &a.profile {
        Some(p) => p.clone(),
        None => verdict::family_of(&a.candidate)?.to_string(),
    };
    let mut profile = verdict::profile(&family).ok_or_else(|| {
        anyhow::anyhow!(
            "--profile {family}: unknown (one of {})",
            verdict::profiles().iter().map(|p| p.name.clone()).collect::<Vec<_>>().join(", ")
        )
    })?;
    if let Some(v) = a.max_ppl_ratio {
        profile.max_ppl_ratio = v;
        profile.name = format!("{} (custom)", profile.name);
    }
    if let Some(v) = a.min_exit_agreement {
        profile.min_exit_agreement_pct = v;
        profile.name = format!("{} (custom)", profile.name.trim_end_matches(" (custom)"));
    }
    if let Some(v) = a.min_same_top {
        profile.min_same_top_pct = v;
        profile.name = format!("{} (custom)", profile.name.trim_end_matches(" (custom)"));
    }
    check_ctx("--ctx", a.ctx, &[&a.reference, &a.candidate])?;
    // Every output location is checked, and its temporary made, before any work.
    let pend = |p: &Option<PathBuf>| -> anyhow::Result<Option<ouro_quant::output::PendingOutput>> {
        Ok(match p {
            Some(p) => Some(ouro_quant::output::PendingOutput::file(p, a.force)?),
            None => None,
        })
    };
    let (report_out, markdown_out, plot_out) = (pend(&a.report)?, pend(&a.markdown)?, pend(&a.plot)?);
    let save_out = if a.reference_logits.is_none() { pend(&a.save_reference)? } else { None };
    let text = std::fs::read_to_string(&a.text).map_err(|e| anyhow::anyhow!("{}: {e}", a.text.display()))?;
    let tok = source::load_tokenizer(&a.reference)?;
    let tokens: Vec<u32> = tok
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("{}: tokenizing: {e}", a.text.display()))?
        .get_ids()
        .to_vec();
    let ref_hash = validate::model_hash(&a.reference)?;
    let candidate = source::load(&a.candidate, &Device::Cpu)?;
    let opts = ValidateOptions { ctx: a.ctx, chunks: a.chunks, thresholds };
    let bar = Progress::new("validate", Unit::Items("chunk"), a.json);
    let progress = |done: usize, total: usize| bar.update(done as u64, total as u64, "");
    let name = |p: &PathBuf| p.display().to_string();
    let report = if let Some(stored) = &a.reference_logits {
        validate::check_reference_model(stored, &ref_hash)?;
        validate::validate(ReferenceSource::Stored(stored.clone()), &name(&a.reference), &candidate.model, &name(&a.candidate), &tokens, &name(&a.text), &opts, &progress)?
    } else {
        let reference = source::load(&a.reference, &Device::Cpu)?;
        let pending = save_out;
        let src = ReferenceSource::Model { model: &reference.model, hash: ref_hash, save: pending.as_ref().map(|p| p.path().to_path_buf()) };
        let r = validate::validate(src, &name(&a.reference), &candidate.model, &name(&a.candidate), &tokens, &name(&a.text), &opts, &progress)?;
        if let Some(p) = pending {
            p.commit()?;
        }
        r
    };
    bar.finish();
    let checks = verdict::verdict(&report, &profile);
    let pass = checks.iter().all(|c| c.pass);
    let full = serde_json::json!({"report": report, "profile": profile, "checks": checks, "pass": pass});
    if let Some(p) = report_out {
        write_output(p, (serde_json::to_string_pretty(&full)? + "\n").as_bytes())?;
    }
    if let Some(p) = markdown_out {
        write_output(p, verdict::render_markdown(&report, &checks, &profile).as_bytes())?;
    }
    if let Some(p) = plot_out {
        let png = p.target().extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
        let bytes = if png { verdict::render_png(&report, &checks, &profile) } else { verdict::render_svg(&report, &checks, &profile).into_bytes() };
        write_output(p, &bytes)?;
    }
    if a.json {
        print_json("ouro-quant-validate-1", &full)?;
    } else {
        print!("{}", verdict::render_table(&report, &checks, &profile));
    }
    Ok(if pass { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

struct RunArgs {
    model: PathBuf,
    prompt: Option<String>,
    prompt_tokens: Option<String>,
    chat: Option<String>,
    thinking: bool,
    max_tokens: usize,
    sampling: Sampling,
    exit_threshold: Option<f32>,
    kv: KvArgs,
    dev: DeviceArg,
    max_memory: Option<u64>,
    json: bool,
}

fn run_model(a: RunArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    if let Some(q) = a.exit_threshold {
        anyhow::ensure!((0.0..=1.0).contains(&q), "--exit-threshold {q}: must lie in [0, 1]");
    }
    anyhow::ensure!((0.0..=1.0).contains(&a.sampling.top_p) && a.sampling.top_p > 0.0, "--top-p must lie in (0, 1]");
    anyhow::ensure!(
        a.sampling.temperature.is_finite() && a.sampling.temperature >= 0.0,
        "--temperature {}: must be a finite number >= 0 (0 = greedy)",
        a.sampling.temperature
    );
    let kv_dtype = a.kv.dtype()?;
    let device = device(a.dev)?;
    if let Some(limit) = a.max_memory {
        // Plan before loading: GGUF weights at their size in the file; HF and MLX weights at their
        // stored width on the CPU (MLX: the packed codes, scales and biases, about the size of its
        // files), widened to f32 on GPUs.
        let (config, weights) = if a.model.is_file() {
            let g = source::GgufSource::open(&a.model)?;
            (g.config.clone(), g.file.file_len() as u64)
        } else if ouro_quant::mlx::read::is_mlx_dir(&a.model) {
            let m = ouro_quant::mlx::read::MlxDir::open(&a.model)?;
            let stored = m.weights.iter().map(|t| t.bytes.len() as u64).sum();
            let bytes = if device.is_cpu() { stored } else { m.config.parameter_count() * 4 };
            (m.config.clone(), bytes)
        } else {
            let ck = Checkpoint::open(&a.model)?;
            let width = if device.is_cpu() { ck.dtype().size() as u64 } else { 4 };
            (ck.config.clone(), ck.config.parameter_count() * width)
        };
        let dims = ouro_quant::model::Dims::from_config(&config);
        let ctx = a
            .max_tokens
            .saturating_add(a.prompt.as_deref().or(a.chat.as_deref()).or(a.prompt_tokens.as_deref()).map_or(0, |p| p.len() + 16))
            .min(config.max_position_embeddings);
        let kv = generate::planned_kv_bytes(&dims, a.kv.kv, kv_dtype, ctx);
        if weights + kv > limit {
            anyhow::bail!(
                "--max-memory {limit}: this run needs about {} bytes ({} of weights + {} of KV cache for up to {ctx} tokens)",
                weights + kv,
                weights,
                kv
            );
        }
    }
    let loaded = source::load(&a.model, &device)?;
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
        let enc = tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?;
        enc.get_ids().to_vec()
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampling: a.sampling.clone(),
        exit_threshold: a.exit_threshold,
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
            "prefill {} tokens at {:.1} tok/s; decode {} tokens at {:.1} tok/s; {:.2} loops/token; weights {}; KV {} ({:?}); stopped by {}; projections: {}",
            s.prompt_tokens,
            s.prefill_tokens_per_s,
            s.generated_tokens,
            s.decode_tokens_per_s,
            s.mean_loops_per_token,
            inspect::human_bytes(s.weight_bytes),
            inspect::human_bytes(s.kv_bytes),
            a.kv.kv,
            s.stopped_by,
            s.kernels.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

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
}
