//! `ouro-quant convert`: an HF checkpoint to a GGUF file (llama.cpp's `ouro` layout) or an MLX
//! directory (mlx-lm's layout), optionally validated into the output's model card.
//!
//! Options of the other format are refused rather than ignored ([`check_format_options`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ouro_quant::checkpoint::Checkpoint;
use ouro_quant::inspect;
use ouro_quant::progress::{Progress, Unit};

use super::validate::{check_validation_text, into_card};
use super::{print_json, EVAL_CTX};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Gguf,
    Mlx,
}

#[derive(clap::Args)]
pub struct Args {
    /// HF checkpoint directory.
    pub model: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "gguf")]
    pub format: Format,
    /// GGUF file type: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_1, Q5_0, Q4_K_M, Q4_K_S, Q4_1, Q4_0, IQ4_NL, IQ4_XS, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K, Q2_K_S, IQ3_M, IQ3_S, IQ3_XS, IQ3_XXS, IQ2_M, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S (Q5_K, Q4_K, Q3_K: the _M mixes; Q2_K_S and the i-quants below IQ3_S need --imatrix).
    #[arg(long = "type", default_value = "Q8_0")]
    pub file_type: String,
    /// MLX: bits of the affine quantization (2, 3, 4, 5, 6, 8; 16 keeps the source dtype).
    #[arg(long, default_value_t = 4)]
    pub bits: u32,
    /// MLX: values per scale/bias group (32, 64, 128).
    #[arg(long, default_value_t = 64)]
    pub group_size: usize,
    /// MLX: mixed-precision recipe as mlx-lm defines it (mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6).
    #[arg(long)]
    pub recipe: Option<String>,
    /// MLX: largest shard in bytes (mlx-lm: 5 GiB).
    #[arg(long, hide = true)]
    pub shard_bytes: Option<u64>,
    /// Validate the output against the source on this text and put the result in its model
    /// card: README.md's Validation section (MLX), or a card beside the file, X.md (GGUF).
    #[arg(long, value_name = "TEXT")]
    pub validate: Option<PathBuf>,
    /// Tokens per chunk for --validate (validate's --ctx).
    #[arg(long, default_value_t = EVAL_CTX)]
    pub validate_ctx: usize,
    /// Quantize with this importance matrix (`ouro-quant imatrix`'s output, or llama-imatrix's in
    /// either of its layouts), as llama-quantize --imatrix does; needed by Q2_K_S and the i-quants below IQ3_S. With --format
    /// mlx, each group's scale and bias minimise the importance-weighted error.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Use the importance matrix only for the tensors whose GGUF name contains NAME (repeatable),
    /// as llama-quantize --include-weights.
    #[arg(long, value_name = "NAME", requires = "imatrix", conflicts_with = "exclude_weights")]
    pub include_weights: Vec<String>,
    /// Quantize the tensors whose GGUF name contains NAME without the importance matrix
    /// (repeatable), as llama-quantize --exclude-weights; e.g. `attn_k` (docs/calibration.md).
    #[arg(long, value_name = "NAME", requires = "imatrix")]
    pub exclude_weights: Vec<String>,
    /// Give tensors whose GGUF name matches REGEX this ggml type (repeatable), e.g. `attn_v=Q8_0`.
    #[arg(long = "type-override", value_name = "REGEX=TYPE")]
    pub type_override: Vec<String>,
    /// Output file or directory (default: <model folder name>-<TYPE>.gguf, or
    /// <model folder name>-<bits>bit for MLX, in the current directory).
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// Print the type chosen for each tensor and the expected size, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace an existing output that ouro-quant wrote (never an input or another file).
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

/// Refuses options of the other output format given on the command line (`convert --format mlx
/// --type Q4_K_M` would otherwise write MLX 4-bit and ignore the type).
pub fn check_format_options(matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let Some(("convert", m)) = matches.subcommand() else {
        return Ok(());
    };
    let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    let mlx = matches!(m.get_one::<Format>("format"), Some(Format::Mlx));
    let wrong: &[(&str, &str)] = if mlx {
        &[("file_type", "--type"), ("type_override", "--type-override")]
    } else {
        &[("bits", "--bits"), ("group_size", "--group-size"), ("recipe", "--recipe")]
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

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let ck = Checkpoint::open(&a.model)?;
    for w in &ck.warnings {
        eprintln!("note: {}: {w}", a.model.display());
    }
    let out = match a.format {
        Format::Gguf => convert_gguf(&ck, &a)?,
        Format::Mlx => convert_mlx(&ck, &a)?,
    };
    match (&a.validate, out) {
        (Some(text), Some(out)) => into_card(&a.model, &out, text, a.validate_ctx),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Before any work: the text of `--validate` scores, and the GGUF card beside `out` can be
/// written afterwards (an MLX card is the output's own README.md).
fn check_validation(a: &Args, gguf_out: Option<&Path>) -> anyhow::Result<()> {
    if let (Some(text), false) = (&a.validate, a.dry_run) {
        check_validation_text(&a.model, text, a.validate_ctx)?;
        if let Some(o) = gguf_out {
            ouro_quant::output::check_target(&ouro_quant::gguf::card::card_path(o), true, false)?;
        }
    }
    Ok(())
}

/// Converts to GGUF; returns the path written (`None` for a dry run).
/// `--imatrix`, with `--include-weights` / `--exclude-weights` applied to its entries.
fn read_imatrix(a: &Args) -> anyhow::Result<Option<ouro_quant::imatrix::ImatrixInput>> {
    use ouro_quant::imatrix::{EntryFilter, ImatrixInput};
    let Some(p) = &a.imatrix else { return Ok(None) };
    let mut im = ImatrixInput::read(p)?;
    let filter = match (&a.include_weights[..], &a.exclude_weights[..]) {
        ([], []) => EntryFilter::All,
        (i, []) => EntryFilter::Include(i.to_vec()),
        ([], e) => EntryFilter::Exclude(e.to_vec()),
        _ => anyhow::bail!("--include-weights and --exclude-weights cannot be used together (as in llama-quantize)"),
    };
    im.apply(&filter)?;
    Ok(Some(im))
}

fn convert_gguf(ck: &Checkpoint, a: &Args) -> anyhow::Result<Option<PathBuf>> {
    use ouro_quant::convert::{self, GgufOptions};
    use ouro_quant::gguf::mix::{FileType, TypeOverride};
    use ouro_quant::quant::ggml::GgmlType;
    let ft = FileType::from_name(&a.file_type).ok_or_else(|| {
        anyhow::anyhow!(
            "--type {}: unknown GGUF type (one of {})",
            a.file_type,
            FileType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
        )
    })?;
    let overrides = a
        .type_override
        .iter()
        .map(|o| {
            let (re, ty) = o.rsplit_once('=').ok_or_else(|| anyhow::anyhow!("--type-override {o}: expected REGEX=TYPE"))?;
            let ty = GgmlType::from_name(ty).ok_or_else(|| anyhow::anyhow!("--type-override {o}: unknown ggml type `{ty}`"))?;
            let pattern = regex::Regex::new(re).map_err(|e| anyhow::anyhow!("--type-override {o}: {e}"))?;
            Ok(TypeOverride { pattern, ty })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let imatrix = read_imatrix(a)?;
    let opts = GgufOptions { file_type: ft, overrides, force: a.force, imatrix };
    let json = a.json;
    if a.dry_run {
        let plan = convert::plan_gguf(ck, &opts)?;
        let mut total = 0u64;
        for p in &plan {
            let cols = *p.shape.last().unwrap_or(&1);
            let bytes = (p.shape.iter().product::<usize>() / cols * p.ggml_type.row_bytes(cols)) as u64;
            total += bytes;
            if !json {
                println!("{:<28} {:<7} {:<16} {:>12}", p.gguf_name, p.ggml_type.name(), format!("{:?}", p.shape), inspect::human_bytes(bytes));
            }
        }
        let file_bytes = convert::gguf_file_bytes(ck, &opts)?;
        if json {
            print_json("ouro-quant-convert-plan-1", &serde_json::json!({"file_type": ft.name(), "tensor_bytes": total, "file_bytes": file_bytes, "tensors": plan}))?;
        } else {
            println!("{} tensors, {} of tensor data, {} file ({file_bytes} bytes)", plan.len(), inspect::human_bytes(total), inspect::human_bytes(file_bytes));
        }
        return Ok(None);
    }
    let out = a.output.clone().unwrap_or_else(|| PathBuf::from(format!("{}-{}.gguf", ck.folder_name(), ft.name())));
    check_validation(a, Some(&out))?;
    let bar = Progress::new("convert", Unit::Bytes, json);
    let summary = convert::convert_gguf(ck, &opts, &out, &|done, total, name| bar.update(done, total, name))?;
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

/// Converts to an MLX directory; returns the directory written (`None` for a dry run).
fn convert_mlx(ck: &Checkpoint, a: &Args) -> anyhow::Result<Option<PathBuf>> {
    use ouro_quant::mlx::{write, MlxOptions, Recipe};
    let recipe = a
        .recipe
        .as_ref()
        .map(|r| {
            Recipe::from_name(r).ok_or_else(|| {
                anyhow::anyhow!("--recipe {r}: unknown (one of {})", Recipe::ALL.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "))
            })
        })
        .transpose()?;
    let bits = if a.bits == 16 { None } else { Some(a.bits) };
    let mut opts = MlxOptions::new(bits, a.group_size, recipe, a.force)?;
    if let Some(b) = a.shard_bytes {
        opts.shard_bytes = b;
    }
    if a.imatrix.is_some() {
        anyhow::ensure!(bits.is_some(), "--imatrix with --bits 16: nothing is quantized, so an importance matrix has nothing to weight");
        opts.imatrix = read_imatrix(a)?;
    }
    let json = a.json;
    if a.dry_run {
        let plan = write::plan_mlx(ck, &opts)?;
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
        return Ok(None);
    }
    check_validation(a, None)?;
    let out = a.output.clone().unwrap_or_else(|| PathBuf::from(write::default_output_name(ck, &opts)));
    let bar = Progress::new("convert", Unit::Bytes, json);
    let summary = write::convert_mlx(ck, &opts, &out, &|done, total, name| bar.update(done, total, name))?;
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
    Ok(Some(out))
}
