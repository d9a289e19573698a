//! `ouro-quant validate`: a quantized model against its reference over a text (perplexity, KL,
//! per-loop quality, exit behaviour), judged by the candidate's quantization profile.
//! Also the `--validate` step of `convert`, which puts the verdict in the output's model card.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::Device;
use ouro_quant::eval::validate::{self as eval_validate, ReferenceSource, ValidateOptions};
use ouro_quant::eval::verdict;
use ouro_quant::model::source;
use ouro_quant::output::PendingOutput;
use ouro_quant::progress::{Progress, Unit};

use super::perplexity::THRESHOLDS;
use super::{check_ctx, check_thresholds, pass_fail, print_json, write_output, EvalArgs, LoopsArg};

#[derive(clap::Args)]
pub struct Args {
    /// The reference: an HF checkpoint directory (or any model `run` reads).
    #[arg(long)]
    pub reference: PathBuf,
    /// The candidate: a GGUF file, an MLX directory or an HF directory.
    #[arg(long)]
    pub candidate: PathBuf,
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Exit thresholds q to study, comma separated (0.5 is always included: the verdict uses it).
    /// The same option as run's and perplexity's (`--thresholds` is still accepted).
    #[arg(long = "exit-threshold", alias = "thresholds", value_delimiter = ',', default_value = THRESHOLDS)]
    pub thresholds: Vec<f32>,
    /// Both models run this many loops (see run's --loops): where extra loops help or hurt, before
    /// and after quantization.
    #[command(flatten)]
    pub loops: LoopsArg,
    /// Verdict profile: float, 8bit, 6bit, 4bit, 3bit, 2bit, 1bit (default: from the candidate's type).
    #[arg(long)]
    pub profile: Option<String>,
    /// Override the profile's limit on the default-mode perplexity ratio.
    #[arg(long)]
    pub max_ppl_ratio: Option<f64>,
    /// Override the profile's minimum exit agreement at q = 0.5 (percent).
    #[arg(long)]
    pub min_exit_agreement: Option<f64>,
    /// Override the profile's minimum same-top-token share (percent, of the tokens the reference
    /// has decided: its top token at least twice as likely as the runner-up).
    #[arg(long)]
    pub min_same_top: Option<f64>,
    /// Also answer the prompts of a task file (JSON Lines: prompt, answer, chat, match,
    /// max_tokens; see docs/validation.md) greedily with both models, at every fixed depth, in the
    /// default mode and at each exit threshold: accuracy, loops and answer agreement.
    #[arg(long)]
    pub tasks: Option<PathBuf>,
    /// Override the profile's minimum share of task items both models answer identically
    /// (percent; needs --tasks).
    #[arg(long, requires = "tasks")]
    pub min_answer_agreement: Option<f64>,
    /// Write the report as JSON (schema in formats/validate-report.md).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write a Markdown summary (for model cards).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write a plot (SVG or PNG, by the file's extension): exit-loop histograms per q and
    /// per-loop perplexity.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Store the reference's outputs so that other candidates skip the reference run.
    #[arg(long, conflicts_with = "reference_logits")]
    pub save_reference: Option<PathBuf>,
    /// Use stored reference outputs instead of running the reference.
    #[arg(long)]
    pub reference_logits: Option<PathBuf>,
    /// Print the report JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Replace existing --report/--markdown/--plot/--save-reference files (only regular files
    /// that are none of the inputs).
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    check_thresholds(&a.thresholds)?;
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
    let custom = |name: &str| format!("{} (custom)", name.trim_end_matches(" (custom)"));
    if let Some(v) = a.max_ppl_ratio {
        profile.max_ppl_ratio = v;
        profile.name = custom(&profile.name);
    }
    if let Some(v) = a.min_exit_agreement {
        profile.min_exit_agreement_pct = v;
        profile.name = custom(&profile.name);
    }
    if let Some(v) = a.min_same_top {
        profile.min_same_top_pct = v;
        profile.name = custom(&profile.name);
    }
    if let Some(v) = a.min_answer_agreement {
        profile.min_answer_agreement_pct = v;
        profile.name = custom(&profile.name);
    }
    // the task file is read before any model runs: a bad item fails now, naming its line
    let tasks = match &a.tasks {
        Some(p) => Some(ouro_quant::eval::tasks::read_tasks(p)?),
        None => None,
    };
    a.eval.check(&[&a.reference, &a.candidate])?;
    // Every output location is checked, and its temporary made, before any work.
    let pend = |p: &Option<PathBuf>| -> anyhow::Result<Option<PendingOutput>> {
        Ok(match p {
            Some(p) => Some(PendingOutput::file(p, a.force)?),
            None => None,
        })
    };
    let (report_out, markdown_out, plot_out) = (pend(&a.report)?, pend(&a.markdown)?, pend(&a.plot)?);
    let save_out = if a.reference_logits.is_none() { pend(&a.save_reference)? } else { None };
    let text_path = &a.eval.text;
    let text = std::fs::read_to_string(text_path).map_err(|e| anyhow::anyhow!("{}: {e}", text_path.display()))?;
    let tok = source::load_tokenizer(&a.reference)?;
    let tokens: Vec<u32> = tok
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("{}: tokenizing: {e}", text_path.display()))?
        .get_ids()
        .to_vec();
    let ref_hash = eval_validate::model_hash(&a.reference)?;
    let mut candidate = source::load(&a.candidate, &Device::Cpu)?;
    a.loops.apply(&mut candidate.model)?;
    let opts = ValidateOptions { ctx: a.eval.ctx, chunks: a.eval.chunks, thresholds };
    let bar = Progress::new("validate", Unit::Items("chunk"), a.json);
    let progress = |done: usize, total: usize| bar.update(done as u64, total as u64, "");
    let name = |p: &PathBuf| p.display().to_string();
    // the reference model runs unless its outputs are stored and no task file needs its answers
    let mut reference = match a.reference_logits.is_none() || tasks.is_some() {
        true => {
            let mut r = source::load(&a.reference, &Device::Cpu)?;
            a.loops.apply(&mut r.model)?;
            Some(r)
        }
        false => None,
    };
    let mut report = if let Some(stored) = &a.reference_logits {
        eval_validate::check_reference_model(stored, &ref_hash)?;
        let src = ReferenceSource::Stored(stored.clone());
        eval_validate::validate(src, &name(&a.reference), &candidate.model, &name(&a.candidate), &tokens, &name(text_path), &opts, &progress)?
    } else {
        let reference = reference.as_ref().expect("loaded above");
        let src = ReferenceSource::Model { model: &reference.model, hash: ref_hash, save: save_out.as_ref().map(|p| p.path().to_path_buf()) };
        let r = eval_validate::validate(src, &name(&a.reference), &candidate.model, &name(&a.candidate), &tokens, &name(text_path), &opts, &progress)?;
        if let Some(p) = save_out {
            p.commit()?;
        }
        r
    };
    bar.finish();
    if let (Some(items), Some(reference)) = (&tasks, reference.as_mut()) {
        use ouro_quant::eval::tasks;
        let modes = tasks::modes(candidate.model.dims.loops, &opts.thresholds);
        // the runner's defaults (run, perplexity): full cache, skipped loops run when needed, f16 storage
        let kv = tasks::KvSettings { kv: ouro_quant::model::KvPolicy::Full, fill: ouro_quant::model::SkipFill::Compute, dtype: candle_core::DType::F16 };
        let bar = Progress::new("tasks", Unit::Items("answer"), a.json);
        let progress = |done: usize, total: usize| bar.update(done as u64, total as u64, "");
        let r_tok = reference.tokenizer.clone().unwrap_or_else(|| tok.clone());
        let r_answers = tasks::answer_all(&mut reference.model, &r_tok, reference.chat_template.as_deref(), items, &modes, kv, &|d, t| progress(d, 2 * t))?;
        let c_tok = candidate.tokenizer.clone().unwrap_or_else(|| tok.clone());
        let n = modes.len() * items.len();
        let c_answers = tasks::answer_all(&mut candidate.model, &c_tok, candidate.chat_template.as_deref(), items, &modes, kv, &|d, _| progress(n + d, 2 * n))?;
        bar.finish();
        let file = a.tasks.as_ref().expect("read above").display().to_string();
        report.tasks = Some(tasks::TaskReport::new(&file, items, &modes, &r_answers, &c_answers));
    }
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
    Ok(pass_fail(pass))
}

/// Checks, before a conversion starts, that `--validate TEXT` can be honoured afterwards: the text
/// reads and tokenizes (with the source's tokenizer) to at least one chunk of `ctx` tokens.
pub fn check_validation_text(model: &Path, text: &Path, ctx: usize) -> anyhow::Result<()> {
    let t = std::fs::read_to_string(text).map_err(|e| anyhow::anyhow!("--validate {}: {e}", text.display()))?;
    check_ctx("--validate-ctx", ctx, &[model])?;
    let tok = source::load_tokenizer(model)?;
    let n = tok.encode(t.as_str(), false).map_err(|e| anyhow::anyhow!("--validate {}: tokenizing: {e}", text.display()))?.get_ids().len();
    anyhow::ensure!(n >= ctx, "--validate {}: {n} tokens, fewer than one chunk of --validate-ctx {ctx}: nothing would be scored", text.display());
    Ok(())
}

/// Validates a conversion against its source and puts the Markdown summary in its model card: the
/// Validation section of an MLX directory's README.md, or a new card beside a GGUF file (X.md).
pub fn into_card(source_dir: &Path, out: &Path, text: &Path, ctx: usize) -> anyhow::Result<ExitCode> {
    let t = std::fs::read_to_string(text).map_err(|e| anyhow::anyhow!("{}: {e}", text.display()))?;
    let tok = source::load_tokenizer(source_dir)?;
    let tokens = tok.encode(t.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
    let reference = source::load(source_dir, &Device::Cpu)?;
    let candidate = source::load(out, &Device::Cpu)?;
    let thresholds = THRESHOLDS.split(',').map(|q| q.parse().expect("constant")).collect();
    let opts = ValidateOptions { ctx, chunks: None, thresholds };
    let src = ReferenceSource::Model { model: &reference.model, hash: eval_validate::model_hash(source_dir)?, save: None };
    let r = eval_validate::validate(
        src,
        &source_dir.display().to_string(),
        &candidate.model,
        &out.display().to_string(),
        &tokens,
        &text.display().to_string(),
        &opts,
        &|_, _| {},
    )?;
    let profile = verdict::profile(verdict::family_of(out)?).expect("shipped profile");
    let checks = verdict::verdict(&r, &profile);
    verdict::write_card(out, &verdict::render_markdown(&r, &checks, &profile))?;
    print!("{}", verdict::render_table(&r, &checks, &profile));
    Ok(pass_fail(checks.iter().all(|c| c.pass)))
}
