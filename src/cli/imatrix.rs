//! `ouro-quant imatrix`: an importance matrix for `convert --imatrix` (and llama-quantize's), from
//! a calibration text, in llama.cpp's imatrix GGUF layout or its legacy `.dat` one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;
use ouro_quant::imatrix::{collect, Calibration, Format, Weighting};
use ouro_quant::model::source;
use ouro_quant::progress::{Progress, Unit};

use super::{check_ctx, print_json};

#[derive(clap::Args)]
pub struct Args {
    /// Model: an HF checkpoint directory (run in f32 activations on its stored weights), or a GGUF
    /// file or MLX directory.
    pub model: PathBuf,
    /// UTF-8 calibration text (tokenized with the model's tokenizer, without special tokens). Keep
    /// it apart from the text you validate with.
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens per chunk; each chunk runs in one pass with a fresh cache (llama-imatrix's -c).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Use at most this many chunks (default: every whole chunk of the text).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Which loops' inputs count: `loops` (every loop of every token, what llama-imatrix computes
    /// on a looped model) or `exit:q` (loop t of a token only while adaptive exit at threshold q
    /// would still run it; `exit` is exit:0.5). See formats/imatrix.md.
    #[arg(long, default_value = "loops", value_parser = Weighting::parse)]
    pub weighting: Weighting,
    /// The file to write.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// `gguf` (llama.cpp's current layout) or `dat` (its legacy binary layout).
    #[arg(long, value_enum, default_value = "gguf")]
    pub output_format: Format,
    /// Replace an existing output that ouro-quant wrote (never an input or another file).
    #[arg(long)]
    pub force: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    // every location checked before the model is loaded
    ouro_quant::output::check_target(&a.output, a.force, false)?;
    check_ctx("--ctx", a.ctx, &[&a.model])?;
    let body = std::fs::read_to_string(&a.text).map_err(|e| anyhow::anyhow!("{}: {e}", a.text.display()))?;
    let start = Instant::now();
    let loaded = source::load(&a.model, &Device::Cpu)?;
    let tok = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{}: no tokenizer.json to tokenize the text with", a.model.display()))?;
    let ids = tok.encode(body.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", a.text.display()))?.get_ids().to_vec();
    let cal = Calibration { tokens: &ids, ctx: a.ctx, chunks: a.chunks, weighting: a.weighting, dataset: a.text.display().to_string() };
    let bar = Progress::new("imatrix", Unit::Items("chunk"), a.json);
    let t0 = Instant::now();
    let m = collect(&loaded.model, &cal, &mut |done, total| bar.update(done as u64, total as u64, ""))
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", a.model.display()))?;
    bar.finish();
    let secs = t0.elapsed().as_secs_f64();
    let chunks = ids.len() / a.ctx;
    let chunks = a.chunks.map_or(chunks, |c| c.min(chunks));
    let tokens = chunks * a.ctx;
    let path = m.write(&a.output, a.output_format, a.force)?;
    let summary = serde_json::json!({
        "output": path,
        "format": a.output_format,
        "weighting": a.weighting.name(),
        "entries": m.entries.len(),
        "chunks": chunks,
        "ctx": a.ctx,
        "tokens": tokens,
        "loops": loaded.model.dims.loops,
        "chunk_count": m.chunk_count,
        "rows_counted": m.entries.values().map(|e| e.count as u64).max().unwrap_or(0),
        "seconds": secs,
        "tokens_per_second": tokens as f64 / secs,
        "total_seconds": start.elapsed().as_secs_f64(),
    });
    if a.json {
        print_json("ouro-quant-imatrix-1", &summary)?;
    } else {
        println!(
            "wrote {} ({} entries, {} chunks of {} tokens, weighting {}, {} rows per weight; {:.1} tokens/s)",
            path.display(),
            m.entries.len(),
            chunks,
            a.ctx,
            a.weighting.name(),
            summary["rows_counted"],
            tokens as f64 / secs
        );
    }
    Ok(ExitCode::SUCCESS)
}
