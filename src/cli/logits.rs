//! `ouro-quant logits`: every loop's hidden state, logits, gate logits and exit pdf for a token
//! sequence, in the tensors of the golden `expected.safetensors` (for comparing with PyTorch).

use std::path::PathBuf;
use std::process::ExitCode;

use ouro_quant::model::{dump, source};

use super::{device, model_context, print_json, DeviceArg, LoopsArg};

#[derive(clap::Args)]
pub struct Args {
    /// Model: an HF checkpoint directory, a GGUF file or an MLX directory.
    pub model: PathBuf,
    /// Token ids, comma separated.
    #[arg(long, conflicts_with = "tokens_file", required_unless_present = "tokens_file")]
    pub tokens: Option<String>,
    /// File of token ids separated by commas or whitespace.
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
    /// The safetensors file to write.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub loops: LoopsArg,
    /// Where to run: cpu, or cuda / metal in builds with that feature.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Replace an existing output that ouro-quant wrote (never an input or another file).
    #[arg(long)]
    pub force: bool,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let text = match (a.tokens, &a.tokens_file) {
        (Some(t), _) => t,
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
        (None, None) => unreachable!("clap requires one"),
    };
    let ids = dump::parse_token_list(&text)?;
    ouro_quant::output::check_target(&a.output, a.force, false)?;
    let limit = model_context(&a.model)?;
    anyhow::ensure!(ids.len() <= limit, "{} tokens: more than the model's context of {limit} (max_position_embeddings)", ids.len());
    let mut loaded = source::load(&a.model, &device(a.device)?)?;
    a.loops.apply(&mut loaded.model)?;
    let path = dump::write_logits(&loaded.model, &ids, &a.output, a.force)?;
    if a.json {
        print_json("ouro-quant-logits-1", &serde_json::json!({"path": path, "tokens": ids.len(), "loops": loaded.model.dims.loops}))?;
    } else {
        println!("wrote {} ({} tokens, {} loops)", path.display(), ids.len(), loaded.model.dims.loops);
    }
    Ok(ExitCode::SUCCESS)
}
