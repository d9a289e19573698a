//! `ouro-quant inspect`: describe a checkpoint, a GGUF file or an MLX directory, scan it for
//! NaN/Inf, or verify one of our outputs against the checksums recorded in it.

use std::path::PathBuf;
use std::process::ExitCode;

use ouro_quant::checkpoint::Checkpoint;
use ouro_quant::inspect;

use super::{pass_fail, print_json};

#[derive(clap::Args)]
pub struct Args {
    /// HF checkpoint directory (config.json + model.safetensors or shards), a GGUF file, or an MLX
    /// directory.
    pub path: PathBuf,
    /// List every tensor with dtype, shape, bytes and file.
    #[arg(long)]
    pub tensors: bool,
    /// Read every value and report NaN/Inf per tensor (non-zero exit if any).
    #[arg(long)]
    pub scan: bool,
    /// Check a GGUF file or an MLX directory written by ouro-quant against the checksums
    /// recorded in it (every tensor, the header, every file); exit 1 naming what differs.
    #[arg(long, conflicts_with_all = ["tensors", "scan"])]
    pub verify: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let Args { path, tensors, scan, verify, json } = a;
    if verify {
        let r = ouro_quant::verify::verify(&path)?;
        if json {
            print_json("ouro-quant-verify-1", &r)?;
        } else {
            print!("{}", r.render());
        }
        return Ok(pass_fail(r.ok()));
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
        anyhow::ensure!(
            !scan && !tensors,
            "--scan and --tensors read HF checkpoints; an MLX directory is described as a whole (--verify checks its files)"
        );
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
    Ok(pass_fail(!report.scan.as_ref().is_some_and(|s| !s.bad.is_empty())))
}
