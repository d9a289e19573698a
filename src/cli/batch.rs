//! `ouro-quant batch`: every source x target of a manifest, resumably, with SHA256SUMS and a
//! summary table; a progress bar per running job on a terminal, plain lines otherwise.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ouro_quant::batch;
use ouro_quant::progress::{Progress, Unit};

use super::print_json;

#[derive(clap::Args)]
pub struct Args {
    /// The manifest (TOML).
    pub manifest: PathBuf,
    /// Conversions run at a time (within the manifest's memory budget).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// List the jobs and what would happen, convert nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Redo outputs that exist without a matching record (only outputs ouro-quant wrote).
    #[arg(long)]
    pub force: bool,
    /// Print the outcomes as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let m = batch::read_manifest(&a.manifest)?;
    let list = batch::jobs(&m);
    for j in &list {
        ouro_quant::output::register_input(&j.source_path);
    }
    if let Some(v) = &m.validate {
        ouro_quant::output::register_input(&v.text);
    }
    if let Some(c) = &m.calibration {
        ouro_quant::output::register_input(&c.text);
    }
    if a.dry_run {
        if a.json {
            print_json("ouro-quant-batch-plan-1", &serde_json::json!({"jobs": list}))?;
        } else {
            for j in &list {
                let exists = m.output_dir.join(&j.output).exists();
                println!(
                    "{:<32} from {:<16} {:<40} {}{}",
                    j.output,
                    j.source,
                    j.options,
                    if exists { "exists" } else { "to convert" },
                    if j.validate { ", validate" } else { "" }
                );
            }
            println!("{} jobs into {}", list.len(), m.output_dir.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let multi = MultiProgress::new();
    if a.json {
        multi.set_draw_target(ProgressDrawTarget::hidden());
    }
    let overall = multi.add(ProgressBar::new(list.len() as u64).with_style(ProgressStyle::with_template("batch {bar:30} {pos}/{len} jobs {elapsed}").expect("template")));
    let bars: Mutex<BTreeMap<usize, ProgressBar>> = Default::default();
    // off a terminal, plain periodic lines per job (the bars above draw only on one)
    let plain: Mutex<BTreeMap<usize, Progress>> = Default::default();
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
        if !a.json {
            let _ = multi.println(format!("{:<9} {}{}", o.status, o.output, o.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()));
        }
    };
    let outcomes = batch::run(&m, a.jobs, a.force, &progress, &started, &finished)?;
    overall.finish_and_clear();
    let count = |s: &str| outcomes.iter().filter(|o| o.status == s).count();
    let failed = count("failed");
    if a.json {
        print_json("ouro-quant-batch-1", &serde_json::json!({"outcomes": outcomes}))?;
    } else {
        print!("{}", std::fs::read_to_string(m.output_dir.join("summary.md")).unwrap_or_default());
        println!(
            "{} converted, {} skipped, {failed} failed; SHA256SUMS, summary.md and summary.json in {}",
            count("converted"),
            count("skipped"),
            m.output_dir.display()
        );
    }
    Ok(super::pass_fail(failed == 0))
}
