//! The `ouro-quant` command line: argument parsing, dispatch and printing only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use ouro_quant::checkpoint::Checkpoint;
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
        /// HF checkpoint directory (config.json + model.safetensors or shards).
        path: PathBuf,
        /// List every tensor with dtype, shape, bytes and file.
        #[arg(long)]
        tensors: bool,
        /// Read every value and report NaN/Inf per tensor (non-zero exit if any).
        #[arg(long)]
        scan: bool,
        /// Print the report as JSON.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Inspect {
            path,
            tensors,
            scan,
            json,
        } => {
            let ck = Checkpoint::open(&path)?;
            let report = inspect::inspect(&ck, tensors, scan);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
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
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}")
                    .expect("template"),
            );
            if json {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let start = Instant::now();
            let dir = synth::synth(&opts, &output, force, &|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            let ck = Checkpoint::open(&dir)?;
            let secs = start.elapsed().as_secs_f64();
            let params = ck.config.parameter_count();
            let bytes = ck.weights.bytes_on_disk();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"path": dir, "parameters": params, "bytes": bytes, "seconds": secs})
                );
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
    }
}
