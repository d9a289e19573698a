//! `ouro-quant synth`: a random-weight checkpoint in the exact HF layout of the Ouro models (for
//! benchmarks and tests; real weights cannot be downloaded everywhere).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use ouro_quant::checkpoint::Checkpoint;
use ouro_quant::inspect::{self, parse_weight_dtype};
use ouro_quant::progress::{Progress, Unit};
use ouro_quant::synth::{self, Preset, SynthOptions};

use super::print_json;

#[derive(clap::Args)]
pub struct Args {
    /// Model shapes.
    #[arg(long, value_enum)]
    pub preset: Preset,
    /// Physical layer count instead of the preset's.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Random seed (same seed, same bytes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Split the weights into this many shards with an index.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Output directory (must not exist).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Replace an existing output directory that ouro-quant wrote.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let dtype = parse_weight_dtype(&a.dtype).ok_or_else(|| anyhow::anyhow!("--dtype {}: expected bf16, f16 or f32", a.dtype))?;
    let opts = SynthOptions { preset: a.preset, layers: a.layers, seed: a.seed, dtype, shards: a.shards };
    let bar = Progress::new("synth", Unit::Bytes, a.json);
    let start = Instant::now();
    let dir = synth::synth(&opts, &a.output, a.force, &|done, total| bar.update(done, total, ""))?;
    bar.finish();
    let ck = Checkpoint::open(&dir)?;
    let secs = start.elapsed().as_secs_f64();
    let params = ck.config.parameter_count();
    let bytes = ck.weights.bytes_on_disk();
    if a.json {
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
