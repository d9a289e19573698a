//! Trains the project's small trained Ouro fixtures (a development tool, not part of the CLI):
//! `--preset tiny` (the default) makes `fixtures/ouro-tiny-trained`, `--preset deep` the second one,
//! `fixtures/ouro-deep-trained`, whose text adds walks of 1 to 4 moves (see
//! `ouro_quant::corpus`) so that depth matters.
//!
//! cargo run --release --example train_tiny -- --out fixtures/ouro-tiny-trained
//! cargo run --release --example train_tiny -- --preset deep --out DIR --checkpoint FILE --minutes 120
//! cargo run --release --example train_tiny -- --preset deep --out DIR --checkpoint FILE --resume FILE
//!
//! Long runs save a checkpoint (parameters, optimizer moments, step, batch generator) every
//! `--checkpoint-every` steps and when `--minutes` is spent; `--resume FILE` goes on from it with
//! the same numbers as a run that never stopped (the options must be the same; checked).
//!
//! Stage 1 trains everything on the paper's objective: per token, the expected cross-entropy of the
//! loops under the exit distribution, plus beta times the KL divergence from the exit distribution to
//! the uniform one (an entropy regulariser that keeps the gate from collapsing onto one loop). Beta
//! falls linearly from `--beta-start` (2.0) to `--beta` (0.1): early in training the first loop is
//! the best, and with a small beta from the start the gate put all the mass there and the deeper
//! loops stopped learning (seen in a first run: p = [0.65, 0.26, 0.07, 0.02] after 50 steps).
//! Stage 2 trains only the exit gate, on frozen states: at loop t < T-1 the gate should exit when
//! the next loop would lower the token's cross-entropy by less than `gamma` nats.

use ouro_quant::corpus;
mod checkpoint;
mod model;
mod optim;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ouro_quant::stfile::{DType as StDType, TensorSpec, Writer};

struct Args {
    recipe: Recipe,
    out: PathBuf,
    seed: u64,
    steps: usize,
    gate_steps: usize,
    batch: usize,
    seq: usize,
    lr: f64,
    /// Final weight of the KL term; it starts at `beta_start` and falls linearly over stage 1, so
    /// that every loop is trained before the gate may concentrate the mass.
    beta: f64,
    beta_start: f64,
    gamma: f32,
    /// Save the weights after stage 1 here (f32 safetensors) / start from them, skipping stage 1.
    save_stage1: Option<PathBuf>,
    load_stage1: Option<PathBuf>,
    /// Stage-1 checkpoint file, written every `checkpoint_every` steps and when `minutes` is spent.
    checkpoint: Option<PathBuf>,
    checkpoint_every: usize,
    resume: Option<PathBuf>,
    /// Stop stage 1 (saving the checkpoint) once this many minutes have passed.
    minutes: Option<f64>,
    /// Parts of each batch run on their own threads (the gradients summed in order).
    shards: usize,
    /// Print held-out perplexities per loop every this many steps (0: never).
    monitor_every: usize,
}

/// What a preset fixes: the shapes, the corpus, and the defaults of the training options.
#[derive(Debug, Clone, Copy)]
struct Recipe {
    name: &'static str,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab_target: usize,
    people: usize,
    train_lines: usize,
    valid_lines: usize,
    /// Percent of walk lines (`corpus::mixed_lines`); `None`: the first corpus only
    /// (`corpus::lines`, whose draws differ).
    chain_share: Option<usize>,
    steps: usize,
    gate_steps: usize,
    batch: usize,
    seq: usize,
    shards: usize,
    lr: f64,
    beta: f64,
    beta_start: f64,
    gamma: f32,
    /// How training rows are cut from the text.
    packing: Packing,
    /// Stage-1 steps over which the longest chain a batch may hold rises from 1 step to
    /// `corpus::CHAIN_MAX_STEPS` (0: all from the start). Only with `Packing::Lines`.
    curriculum: usize,
    /// Stage-1 steps over which the loops trained rise from 1 to `LOOPS`, a quarter each
    /// (0: all from the start). See `level`.
    loop_curriculum: usize,
    /// Standard deviation of the initial token embeddings.
    embed_std: f64,
}

/// How training rows (and the held-out monitor's windows) are cut from the text.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Packing {
    /// Random windows of the token stream (the first fixture's recipe): a row may start in the
    /// middle of a line, so an answer may arrive without what it depends on.
    Windows,
    /// Whole lines drawn one by one and packed into the row, the last one cut at the row's end:
    /// every answer comes with its line's links. Lets a curriculum choose which lines are drawn.
    Lines,
}

const LOOPS: usize = 4;

/// `fixtures/ouro-tiny-trained`: 1.6 M parameters, the first corpus.
const TINY: Recipe = Recipe {
    name: "ouro-tiny-trained",
    hidden: 256,
    inter: 512,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    vocab_target: 1024,
    people: 40,
    train_lines: 60_000,
    valid_lines: 600,
    chain_share: None,
    steps: 1400,
    gate_steps: 200,
    batch: 16,
    seq: 96,
    shards: 1,
    lr: 3e-3,
    beta: 0.1,
    beta_start: 2.0,
    gamma: 0.005,
    packing: Packing::Windows,
    curriculum: 0,
    loop_curriculum: 0,
    embed_std: 0.02,
};

/// `fixtures/ouro-deep-trained`: one physical layer looped four times (a loop can then make one
/// move of a walk and no more, so walks of one to four moves need one to four loops; with two
/// layers a pass made two moves at once and the loops added little: docs/training.md), wider, and
/// 60% walk lines (`corpus::chain_line`); the longest walk in the batches rises by one move every
/// 300 steps, just after the loop that makes it enters training.
const DEEP: Recipe = Recipe {
    name: "ouro-deep-trained",
    hidden: 256,
    inter: 1024,
    layers: 1,
    heads: 4,
    kv_heads: 2,
    vocab_target: 2048,
    people: 40,
    train_lines: 200_000,
    valid_lines: 600,
    chain_share: Some(60),
    steps: 8000,
    gate_steps: 300,
    batch: 16,
    seq: 128,
    shards: 2,
    lr: 2e-3,
    beta: 0.1,
    beta_start: 2.0,
    gamma: 0.005,
    packing: Packing::Lines,
    curriculum: 1200,
    loop_curriculum: 1000,
    embed_std: 1.0,
};

impl Recipe {
    fn lines(&self, world: &corpus::World, seed: u64, n: usize) -> Vec<String> {
        match self.chain_share {
            None => corpus::lines(world, seed, n),
            Some(share) => corpus::mixed_lines(world, seed, n, share),
        }
    }
}

/// Every option the trainer takes (each followed by a value). An option outside this list, or one
/// without its value, stops the trainer before any work: a mistyped `--resume` or `--steps` in a
/// run of hours must not be silently ignored.
const OPTIONS: &[&str] = &[
    "--preset", "--out", "--seed", "--steps", "--gate-steps", "--batch", "--seq", "--lr", "--beta", "--beta-start",
    "--gamma", "--save-stage1", "--load-stage1", "--checkpoint", "--checkpoint-every", "--resume", "--minutes",
    "--shards", "--monitor-every", "--hidden", "--inter", "--layers", "--heads", "--kv-heads", "--train-lines",
    "--curriculum", "--loop-curriculum", "--chain-share", "--embed-std", "--packing", "--calibration", "--tasks",
    "--report",
];

/// What the command line asks for: the usage (`--help`), or a run whose options are all known
/// and valued; refused with the list of known options otherwise.
#[derive(Debug, PartialEq)]
enum Command {
    Help,
    Run,
}

fn check_args(a: &[String]) -> anyhow::Result<Command> {
    if a.iter().any(|x| x == "--help" || x == "-h") {
        return Ok(Command::Help);
    }
    for pair in a.chunks(2) {
        anyhow::ensure!(
            OPTIONS.contains(&pair[0].as_str()),
            "`{}`: not an option of train_tiny (each takes a value): {}",
            pair[0],
            OPTIONS.join(" ")
        );
        anyhow::ensure!(pair.get(1).is_some_and(|v| !v.starts_with("--")), "`{}` needs a value", pair[0]);
    }
    Ok(Command::Run)
}

fn parse_args() -> Args {
    let a: Vec<String> = std::env::args().collect();
    let get = |k: &str| a.iter().position(|x| x == k).and_then(|i| a.get(i + 1)).cloned();
    let recipe = match get("--preset").as_deref() {
        None | Some("tiny") => TINY,
        Some("deep") => DEEP,
        Some(p) => panic!("--preset {p}: tiny or deep"),
    };
    // shape and corpus overrides, for experiments (they enter a checkpoint's fingerprint)
    let mut recipe = recipe;
    for (k, field) in [
        ("--hidden", &mut recipe.hidden),
        ("--inter", &mut recipe.inter),
        ("--layers", &mut recipe.layers),
        ("--heads", &mut recipe.heads),
        ("--kv-heads", &mut recipe.kv_heads),
        ("--train-lines", &mut recipe.train_lines),
        ("--curriculum", &mut recipe.curriculum),
        ("--loop-curriculum", &mut recipe.loop_curriculum),
    ] {
        if let Some(v) = get(k) {
            *field = v.parse().unwrap_or_else(|_| panic!("{k} {v}: a whole number"));
        }
    }
    if let Some(v) = get("--chain-share") {
        recipe.chain_share = Some(v.parse().expect("--chain-share: a percentage"));
    }
    if let Some(v) = get("--embed-std") {
        recipe.embed_std = v.parse().expect("--embed-std: a number");
    }
    match get("--packing").as_deref() {
        None => {}
        Some("windows") => recipe.packing = Packing::Windows,
        Some("lines") => recipe.packing = Packing::Lines,
        Some(p) => panic!("--packing {p}: windows or lines"),
    }
    let r = recipe;
    Args {
        recipe,
        out: PathBuf::from(get("--out").unwrap_or_else(|| format!("fixtures/{}", r.name))),
        seed: get("--seed").map_or(1, |s| s.parse().expect("--seed")),
        steps: get("--steps").map_or(r.steps, |s| s.parse().expect("--steps")),
        gate_steps: get("--gate-steps").map_or(r.gate_steps, |s| s.parse().expect("--gate-steps")),
        batch: get("--batch").map_or(r.batch, |s| s.parse().expect("--batch")),
        seq: get("--seq").map_or(r.seq, |s| s.parse().expect("--seq")),
        lr: get("--lr").map_or(r.lr, |s| s.parse().expect("--lr")),
        beta: get("--beta").map_or(r.beta, |s| s.parse().expect("--beta")),
        beta_start: get("--beta-start").map_or(r.beta_start, |s| s.parse().expect("--beta-start")),
        gamma: get("--gamma").map_or(r.gamma, |s| s.parse().expect("--gamma")),
        save_stage1: get("--save-stage1").map(PathBuf::from),
        load_stage1: get("--load-stage1").map(PathBuf::from),
        checkpoint: get("--checkpoint").map(PathBuf::from),
        checkpoint_every: get("--checkpoint-every").map_or(100, |s| s.parse().expect("--checkpoint-every")),
        resume: get("--resume").map(PathBuf::from),
        minutes: get("--minutes").map(|s| s.parse().expect("--minutes")),
        shards: get("--shards").map_or(r.shards, |s| s.parse().expect("--shards")),
        monitor_every: get("--monitor-every").map_or(0, |s| s.parse().expect("--monitor-every")),
    }
}

impl Args {
    /// Everything that decides stage 1's numbers, for a checkpoint's fingerprint.
    fn fingerprint(&self, tokenizer_sum: u128) -> BTreeMap<String, String> {
        let mut f = BTreeMap::new();
        f.insert("recipe".to_string(), format!("{:?}", Recipe { steps: 0, gate_steps: 0, batch: 0, seq: 0, shards: 0, lr: 0.0, beta: 0.0, beta_start: 0.0, gamma: 0.0, ..self.recipe }));
        for (k, v) in [
            ("seed", self.seed.to_string()),
            ("steps", self.steps.to_string()),
            ("batch", self.batch.to_string()),
            ("seq", self.seq.to_string()),
            ("shards", self.shards.to_string()),
            ("lr", self.lr.to_string()),
            ("beta", self.beta.to_string()),
            ("beta_start", self.beta_start.to_string()),
            ("tokenizer", format!("{tokenizer_sum:032x}")),
        ] {
            f.insert(k.to_string(), v);
        }
        f
    }
}

/// Held-out monitor: windows of the validation text and, per token, the group its cross-entropy
/// is reported in: the answers of walks by their move count (1..), the other lines'
/// answers (0); `None` for the rest.
struct Monitor {
    x: Tensor,
    y: Tensor,
    groups: Vec<Option<usize>>,
}

impl Monitor {
    fn new(tok: &tokenizers::Tokenizer, lines: &[String], packing: Packing, windows: usize, seq: usize, dev: &Device) -> anyhow::Result<Monitor> {
        // per token of a text: its id and its group
        let encode = |text: &str| -> anyhow::Result<(Vec<u32>, Vec<Option<usize>>)> {
            let enc = tok.encode(text, false).map_err(anyhow::Error::msg)?;
            let offsets = enc.get_offsets();
            let kinds = corpus::token_kinds(text, offsets);
            let steps = corpus::token_chain_steps(text, offsets);
            let groups = (0..kinds.len()).map(|i| kinds[i].1.then(|| steps[i].unwrap_or(0))).collect();
            Ok((enc.get_ids().to_vec(), groups))
        };
        // rows of seq + 1 tokens: x is the first seq, y (and its groups) the last seq
        let mut rows: Vec<(Vec<u32>, Vec<Option<usize>>)> = vec![];
        match packing {
            Packing::Windows => {
                let (ids, groups) = encode(&(lines.join("\n") + "\n"))?;
                for w in 0..windows.min((ids.len() - 1) / seq) {
                    rows.push((ids[w * seq..(w + 1) * seq + 1].to_vec(), groups[w * seq..(w + 1) * seq + 1].to_vec()));
                }
            }
            Packing::Lines => {
                // the held-out lines in order, each row starting at a line's start
                let mut row: (Vec<u32>, Vec<Option<usize>>) = (vec![], vec![]);
                for line in lines {
                    if rows.len() == windows {
                        break;
                    }
                    let (ids, groups) = encode(&format!("{line}\n"))?;
                    row.0.extend(ids);
                    row.1.extend(groups);
                    if row.0.len() >= seq + 1 {
                        row.0.truncate(seq + 1);
                        row.1.truncate(seq + 1);
                        rows.push(std::mem::take(&mut row));
                    }
                }
            }
        }
        anyhow::ensure!(!rows.is_empty(), "the held-out text is shorter than one row of {seq} tokens");
        let n = rows.len();
        let x: Vec<u32> = rows.iter().flat_map(|r| r.0[..seq].to_vec()).collect();
        let y: Vec<u32> = rows.iter().flat_map(|r| r.0[1..].to_vec()).collect();
        let groups = rows.iter().flat_map(|r| r.1[1..].to_vec()).collect();
        Ok(Monitor { x: Tensor::from_vec(x, (n, seq), dev)?, y: Tensor::from_vec(y, (n, seq), dev)?, groups })
    }

    /// Per group (0: other answers, 1..: chain answers by steps), the perplexity of each loop.
    fn run(&self, m: &model::Model, aux: &model::Aux) -> anyhow::Result<BTreeMap<usize, (usize, Vec<f64>)>> {
        let mut out: BTreeMap<usize, (usize, Vec<f64>)> = BTreeMap::new();
        let n = self.x.dim(0)?;
        for b in (0..n).step_by(16) {
            let len = 16.min(n - b);
            let (states, _) = m.forward(&self.x.narrow(0, b, len)?, aux)?;
            let seq = self.x.dim(1)?;
            for (t, h) in states.iter().enumerate() {
                let ce = model::to_dtype_vec(&model::cross_entropy(&m.logits(&h.detach())?, &self.y.narrow(0, b, len)?)?)?;
                for (i, c) in ce.iter().enumerate() {
                    if let Some(g) = self.groups[b * seq + i] {
                        let e = out.entry(g).or_insert_with(|| (0, vec![0.0; LOOPS]));
                        if t == 0 {
                            e.0 += 1;
                        }
                        e.1[t] += *c as f64;
                    }
                }
            }
        }
        for (count, sums) in out.values_mut() {
            for v in sums.iter_mut() {
                *v = (*v / (*count).max(1) as f64).exp();
            }
        }
        Ok(out)
    }
}

/// A curriculum's level at stage-1 step `step`: 1 at first, one more every `span / levels` steps,
/// `levels` from there on (at once when `span` is 0). The longest chain a batch may hold is
/// `level(r.curriculum, step, CHAIN_MAX_STEPS)`; the loops trained, `level(r.loop_curriculum,
/// step, LOOPS)`.
fn level(span: usize, step: usize, levels: usize) -> usize {
    if span == 0 {
        return levels;
    }
    (1 + step.saturating_mul(levels) / span).min(levels)
}

/// The training lines tokenized one by one (each with its newline), pooled by the steps of their
/// chain (pool 0: the other lines), for `Packing::Lines`.
struct LinePools {
    lines: Vec<Vec<u32>>,
    by_steps: Vec<Vec<usize>>,
    /// Percent of lines drawn from the chain pools.
    chain_share: usize,
}

impl LinePools {
    fn new(tok: &tokenizers::Tokenizer, lines: &[String], chain_share: usize) -> anyhow::Result<LinePools> {
        let texts: Vec<String> = lines.iter().map(|l| format!("{l}\n")).collect();
        let enc = tok.encode_batch(texts, false).map_err(anyhow::Error::msg)?;
        let mut by_steps = vec![vec![]; corpus::CHAIN_MAX_STEPS + 1];
        for (i, l) in lines.iter().enumerate() {
            by_steps[corpus::chain_steps(l).unwrap_or(0)].push(i);
        }
        for (steps, pool) in by_steps.iter().enumerate() {
            let wanted = if steps == 0 { chain_share < 100 } else { chain_share > 0 };
            anyhow::ensure!(!wanted || !pool.is_empty(), "no training line for pool {steps} (chain steps; 0: other lines)");
        }
        Ok(LinePools { lines: enc.iter().map(|e| e.get_ids().to_vec()).collect(), by_steps, chain_share })
    }

    /// One row of `len` tokens: whole lines drawn until it is full (the last one cut), a chain with
    /// probability `chain_share` / 100 (its steps uniform in 1..=cap), else another line.
    fn row(&self, rng: &mut corpus::Rng, len: usize, cap: usize) -> Vec<u32> {
        let mut row = Vec::with_capacity(len + 64);
        while row.len() < len {
            let steps = if rng.below(100) < self.chain_share { 1 + rng.below(cap) } else { 0 };
            let pool = &self.by_steps[steps];
            row.extend_from_slice(&self.lines[pool[rng.below(pool.len())]]);
        }
        row.truncate(len);
        row
    }
}

/// What a stage-1 step prints, for one shard of the batch.
struct Stage1Stats {
    /// The shard's share of the loss (its loss over the number of shards).
    loss: f32,
    kl: f32,
    per_loop: Vec<f32>,
    mean_p: Vec<f32>,
}

/// Stage 1's objective on one shard of a batch, divided by the number of shards (so that the
/// shards' gradients add up to the whole batch's): the expected cross-entropy under the exit
/// distribution plus beta times KL(exit distribution || uniform), over the first `loops` loops.
fn stage1_loss(m: &model::Model, x: &Tensor, y: &Tensor, aux: &model::Aux, beta: f64, shards: usize, loops: usize) -> anyhow::Result<(Tensor, Stage1Stats)> {
    let log_t = (loops as f64).ln();
    let (states, gates) = m.forward_loops(x, aux, loops)?;
    let pdf = model::exit_pdf(&gates)?;
    let mut expected = None;
    let mut neg_entropy = None;
    let mut per_loop = vec![];
    for (t, h) in states.iter().enumerate() {
        let ce = model::cross_entropy(&m.logits(h)?, y)?;
        per_loop.push(ce.mean_all()?.to_scalar::<f32>()?);
        let e = pdf[t].mul(&ce)?;
        let n = pdf[t].mul(&(pdf[t].clone() + 1e-9)?.log()?)?;
        expected = Some(match expected { None => e, Some(a) => (a + e)? });
        neg_entropy = Some(match neg_entropy { None => n, Some(a) => (a + n)? });
    }
    let kl = (neg_entropy.expect("loops").mean_all()? + log_t)?;
    let mut loss = (expected.expect("loops").mean_all()? + (kl.clone() * beta)?)?;
    if shards > 1 {
        loss = (loss / shards as f64)?;
    }
    let mean_p = pdf.iter().map(|p| p.mean_all().and_then(|v| v.to_scalar::<f32>()).unwrap_or(f32::NAN)).collect();
    let stats = Stage1Stats { loss: loss.to_scalar::<f32>()?, kl: kl.to_scalar::<f32>()?, per_loop, mean_p };
    Ok((loss, stats))
}

/// `--report DIR`: the fixture's metrics, computed by the project's runner and evaluation code.
fn report(dir: &std::path::Path) -> anyhow::Result<()> {
    let loaded = ouro_quant::model::source::load(dir, &Device::Cpu)?;
    let tok = loaded.tokenizer.ok_or_else(|| anyhow::anyhow!("no tokenizer"))?;
    let text = std::fs::read_to_string(dir.join("validation.txt"))?;
    let r = ouro_quant::eval::corpus_report(&loaded.model, &tok, &text, 128)?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

/// Checks that this trainer's forward pass is the one `ouro-quant` runs: the same weights, saved in
/// f32 and loaded by the runner, give the same per-loop logits and gate logits.
fn check_against_runner(m: &model::Model, tokens: &[u32], dev: &Device) -> anyhow::Result<f32> {
    let tmp = tempfile::tempdir()?;
    let named = model::named(m);
    let specs: Vec<TensorSpec> = named
        .iter()
        .map(|(n, t)| TensorSpec { name: n.clone(), dtype: StDType::F32, shape: t.dims().to_vec() })
        .collect();
    let mut w = Writer::new(tmp.path().join("model.safetensors"), specs, &BTreeMap::new())?;
    for (_, t) in &named {
        w.write(&model::to_dtype_vec(t)?.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
    }
    w.finish()?;
    let d = m.d;
    let mut cfg = ouro_quant::synth::preset_config(ouro_quant::synth::Preset::Tiny, Some(d.layers));
    let c = cfg.as_object_mut().expect("object");
    for (k, v) in [
        ("vocab_size", d.vocab),
        ("hidden_size", d.hidden),
        ("intermediate_size", d.inter),
        ("num_attention_heads", d.heads),
        ("num_key_value_heads", d.kv_heads),
        ("head_dim", d.head_dim()),
        ("total_ut_steps", d.loops),
    ] {
        c.insert(k.to_string(), serde_json::json!(v));
    }
    c.insert("rope_theta".into(), serde_json::json!(d.theta));
    std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&cfg)?)?;
    let ours = ouro_quant::model::source::load(tmp.path(), dev)?.model;
    let lo = ouro_quant::model::LoopOutputs::new(&ours, &ours.forward_full(tokens, ouro_quant::model::KvPolicy::Full)?)?;
    let a = model::aux(&d, tokens.len(), dev)?;
    let x = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), dev)?;
    let (states, gates) = m.forward(&x, &a)?;
    let mut worst = 0f32;
    for t in 0..d.loops {
        let mine = model::to_dtype_vec(&m.logits(&states[t])?)?;
        worst = mine.iter().zip(&lo.step_logits[t]).map(|(p, q)| (p - q).abs()).fold(worst, f32::max);
        let g = model::to_dtype_vec(&gates[t])?;
        worst = g.iter().zip(&lo.gate_logits[t]).map(|(p, q)| (p - q).abs()).fold(worst, f32::max);
    }
    Ok(worst)
}

/// `--tasks FILE [--seed S] [--preset P]`: the task file of answer-level validation (`validate
/// --tasks`), drawn from seed S + 5 (training used S + 1, validation S + 2): 30 items of each
/// question kind of the first corpus (tiny), or 20 of each and 20 walks of each move
/// count from 1 to 4 (deep; kind `chain-N`, the answer a regular expression for the number).
fn write_tasks(path: &std::path::Path, args: &Args) -> anyhow::Result<()> {
    use std::io::Write;
    let seed = args.seed;
    let world = corpus::World::new(seed, args.recipe.people);
    let mut f = std::fs::File::create_new(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let per_kind = if args.recipe.chain_share.is_some() { 20 } else { 30 };
    for (prompt, answer, kind) in corpus::task_items(&world, seed.wrapping_add(5), per_kind) {
        let item = serde_json::json!({"prompt": prompt, "answer": answer, "kind": kind, "max_tokens": 8});
        writeln!(f, "{item}")?;
    }
    if args.recipe.chain_share.is_some() {
        for (prompt, answer, steps) in corpus::chain_task_items(seed.wrapping_add(5), 20) {
            let item = serde_json::json!({"prompt": prompt, "answer": format!("^ ?{answer}\\b"), "match": "regex", "kind": format!("chain-{steps}"), "max_tokens": 2});
            writeln!(f, "{item}")?;
        }
    }
    Ok(())
}

/// `--calibration FILE [--seed S]`: a calibration text for `imatrix`, as many lines as the
/// validation text, drawn from seed S + 6 (disjoint draws from validation's S + 2).
fn write_calibration(path: &std::path::Path, args: &Args) -> anyhow::Result<()> {
    use std::io::Write;
    let r = args.recipe;
    let world = corpus::World::new(args.seed, r.people);
    let mut f = std::fs::File::create_new(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    f.write_all((r.lines(&world, args.seed.wrapping_add(6), r.valid_lines).join("\n") + "\n").as_bytes())?;
    Ok(())
}

/// glibc hands every large freed block back to the kernel and faults fresh zeroed pages in for the
/// next one; the trainer frees and allocates tensors of megabytes hundreds of times a step (a third
/// of a step went to page faults). Keep freed memory for reuse instead.
fn keep_freed_memory() {
    #[cfg(target_os = "linux")]
    // SAFETY: mallopt only sets allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 30);
    }
}

fn main() -> anyhow::Result<()> {
    if check_args(&std::env::args().skip(1).collect::<Vec<_>>())? == Command::Help {
        println!("train_tiny: trains the project's trained Ouro fixtures (usage: examples/train_tiny/main.rs)");
        println!("options, each with a value: {}", OPTIONS.join(" "));
        return Ok(());
    }
    if let Some(i) = std::env::args().position(|a| a == "--calibration") {
        let path = std::env::args().nth(i + 1).ok_or_else(|| anyhow::anyhow!("--calibration FILE"))?;
        return write_calibration(std::path::Path::new(&path), &parse_args());
    }
    if let Some(i) = std::env::args().position(|a| a == "--tasks") {
        let path = std::env::args().nth(i + 1).ok_or_else(|| anyhow::anyhow!("--tasks FILE"))?;
        return write_tasks(std::path::Path::new(&path), &parse_args());
    }
    if let Some(i) = std::env::args().position(|a| a == "--report") {
        let dir = std::env::args().nth(i + 1).ok_or_else(|| anyhow::anyhow!("--report DIR"))?;
        return report(std::path::Path::new(&dir));
    }
    let args = parse_args();
    let r = args.recipe;
    keep_freed_memory();
    let dev = Device::Cpu;
    let started = Instant::now();
    if args.shards > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // The shards are the parallelism: candle's own pool on top of them oversubscribes the
        // cores (measured: 5.2 -> 3.2 s per deep step on 2 cores). Same numbers either way.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    anyhow::ensure!(args.shards >= 1 && args.batch % args.shards == 0, "--batch {} does not split into --shards {}", args.batch, args.shards);
    // Every location is checked before the long work starts.
    ouro_quant::output::check_target(&args.out, false, true)?;
    if let Some(c) = &args.checkpoint {
        anyhow::ensure!(
            !c.exists() || args.resume.as_ref() == Some(c),
            "{}: exists; pass `--resume {}` to go on from it, or another --checkpoint path",
            c.display(),
            c.display()
        );
        ouro_quant::output::check_managed(c)?;
    }
    let world = corpus::World::new(args.seed, r.people);
    let train_lines = r.lines(&world, args.seed.wrapping_add(1), r.train_lines);
    let valid_lines = r.lines(&world, args.seed.wrapping_add(2), r.valid_lines);

    // Tokenizer, trained on the training text only.
    let tmp = tempfile::tempdir()?;
    let refs: Vec<&str> = train_lines.iter().map(String::as_str).collect();
    ouro_quant::synth::train_tokenizer(tmp.path(), r.vocab_target, &refs)?;
    let tokenizer_sum = ouro_quant::output::checksum(&std::fs::read(tmp.path().join("tokenizer.json"))?);
    let tok = tokenizers::Tokenizer::from_file(tmp.path().join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    let vocab = tok.get_vocab_size(true);
    let train_text = train_lines.join("\n") + "\n";
    let ids: Vec<u32> = tok.encode(train_text.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    eprintln!("corpus: {} training lines, {} tokens, vocab {vocab} ({:.0} s)", train_lines.len(), ids.len(), started.elapsed().as_secs_f64());

    let d = model::Dims {
        vocab,
        hidden: r.hidden,
        inter: r.inter,
        layers: r.layers,
        heads: r.heads,
        kv_heads: r.kv_heads,
        loops: LOOPS,
        eps: 1e-6,
        theta: 10000.0,
    };
    let vm = VarMap::new();
    let m = model::Model::new(d, &vm, args.seed.wrapping_add(7), r.embed_std)?;
    let n_params: usize = model::named(&m).iter().map(|(_, t)| t.elem_count()).sum();
    eprintln!("model: {n_params} parameters");
    let aux = model::aux(&d, args.seq, &dev)?;
    let vars: BTreeMap<String, Var> = vm.data().lock().expect("varmap").iter().map(|(k, v)| (k.clone(), v.clone())).collect();

    // Deterministic batches, cut as the recipe says (`Packing`).
    let pools = (r.packing == Packing::Lines).then(|| LinePools::new(&tok, &train_lines, r.chain_share.unwrap_or(0))).transpose()?;
    let batch = |rng: &mut corpus::Rng, step: usize| -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(args.batch * args.seq);
        let mut y = Vec::with_capacity(args.batch * args.seq);
        for _ in 0..args.batch {
            let row: Vec<u32> = match &pools {
                None => {
                    let s = rng.below(ids.len() - args.seq - 1);
                    ids[s..s + args.seq + 1].to_vec()
                }
                Some(p) => p.row(rng, args.seq + 1, level(r.curriculum, step, corpus::CHAIN_MAX_STEPS)),
            };
            x.extend_from_slice(&row[..args.seq]);
            y.extend_from_slice(&row[1..]);
        }
        Ok((Tensor::from_vec(x, (args.batch, args.seq), &dev)?, Tensor::from_vec(y, (args.batch, args.seq), &dev)?))
    };

    // Stage 1: everything, expected CE under the exit distribution + beta * KL(p || uniform).
    let mut opt = optim::AdamW::new(&vars, args.lr, 0.01)?;
    let fingerprint = args.fingerprint(tokenizer_sum);
    let monitor = Monitor::new(&tok, &valid_lines, r.packing, 64, args.seq, &dev)?;
    let mut rng = corpus::Rng::new(args.seed.wrapping_add(3));
    let mut first_step = 0;
    let stage1_steps = if let Some(p) = &args.load_stage1 {
        vm.clone().load(p)?;
        eprintln!("stage 1 weights loaded from {}", p.display());
        0
    } else {
        args.steps
    };
    if let Some(p) = &args.resume {
        let (saved, state) = checkpoint::load(p, &fingerprint, &dev)?;
        for (name, var) in &vars {
            let t = saved.get(name).ok_or_else(|| anyhow::anyhow!("{}: no parameter `{name}`", p.display()))?;
            anyhow::ensure!(t.dims() == var.dims(), "{}: `{name}` is {:?}, the model's {:?}", p.display(), t.dims(), var.dims());
            var.set(t)?;
        }
        opt.restore(&saved, state.step)?;
        rng = corpus::Rng::from_state(state.rng);
        first_step = state.step;
        eprintln!("resumed from {} at step {first_step}", p.display());
    }
    let save_checkpoint = |opt: &optim::AdamW, next_step: usize, rng: &corpus::Rng| -> anyhow::Result<()> {
        let Some(path) = &args.checkpoint else { return Ok(()) };
        let mut tensors: Vec<(String, Tensor)> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        tensors.extend(opt.moments());
        checkpoint::save(path, &tensors, &checkpoint::State { step: next_step, rng: rng.state(), fingerprint: fingerprint.clone() })
    };
    for step in first_step..stage1_steps {
        if args.minutes.is_some_and(|mins| started.elapsed().as_secs_f64() >= mins * 60.0) {
            save_checkpoint(&opt, step, &rng)?;
            match &args.checkpoint {
                Some(c) => eprintln!("--minutes spent: stopped before step {step}; go on with the same options and `--resume {}`", c.display()),
                None => eprintln!("--minutes spent: stopped before step {step} (no --checkpoint: nothing saved)"),
            }
            return Ok(());
        }
        let warm = 100.min(args.steps / 10).max(1);
        let lr = if step < warm {
            args.lr * (step + 1) as f64 / warm as f64
        } else {
            let p = (step - warm) as f64 / (args.steps - warm).max(1) as f64;
            args.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
        };
        opt.lr = lr;
        let beta = args.beta_start + (args.beta - args.beta_start) * step as f64 / (args.steps.max(2) - 1) as f64;
        let (x, y) = batch(&mut rng, step)?;
        // The batch in `shards` equal parts, each forward and backward on its own thread, the
        // gradients summed in shard order (deterministic whatever the machine).
        let parts: Vec<(Tensor, Tensor)> = if args.shards == 1 {
            vec![(x, y)]
        } else {
            let n = args.batch / args.shards;
            (0..args.shards).map(|i| Ok((x.narrow(0, i * n, n)?, y.narrow(0, i * n, n)?))).collect::<candle_core::Result<_>>()?
        };
        let results: Vec<anyhow::Result<(candle_core::backprop::GradStore, Stage1Stats)>> = std::thread::scope(|sc| {
            let handles: Vec<_> = parts
                .iter()
                .map(|(x, y)| sc.spawn(|| -> anyhow::Result<_> {
                    let (loss, stats) = stage1_loss(&m, x, y, &aux, beta, args.shards, level(r.loop_curriculum, step, LOOPS))?;
                    Ok((loss.backward()?, stats))
                }))
                .collect();
            handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a shard's thread panicked"))?).collect()
        });
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut stats: Vec<Stage1Stats> = vec![];
        for r in results {
            let (g, st) = r?;
            stats.push(st);
            grads = Some(match grads {
                None => g,
                Some(mut acc) => {
                    for var in vars.values() {
                        if let Some(b) = g.get(var) {
                            let sum = match acc.get(var) { Some(a) => (a + b)?, None => b.clone() };
                            acc.insert(var, sum);
                        }
                    }
                    acc
                }
            });
        }
        opt.step(&grads.expect("one shard at least"))?;
        if step % 50 == 0 || step + 1 == args.steps {
            let avg = |f: &dyn Fn(&Stage1Stats) -> Vec<f32>| -> Vec<f32> {
                let n = stats.len() as f32;
                (0..f(&stats[0]).len()).map(|i| (stats.iter().map(|s| f(s)[i]).sum::<f32>() / n * 1000.0).round() / 1000.0).collect()
            };
            let mut cap = if r.packing == Packing::Lines && r.curriculum > 0 { format!(" chains <= {}", level(r.curriculum, step, corpus::CHAIN_MAX_STEPS)) } else { String::new() };
            if r.loop_curriculum > 0 {
                cap += &format!(" loops {}", level(r.loop_curriculum, step, LOOPS));
            }
            eprintln!(
                "step {step:5}{cap} lr {lr:.2e} beta {beta:.2} loss {:.4} CE per loop {:?} mean p {:?} KL {:.3} ({:.0} s)",
                stats.iter().map(|s| s.loss).sum::<f32>(),
                avg(&|s| s.per_loop.clone()),
                avg(&|s| s.mean_p.clone()),
                stats.iter().map(|s| s.kl).sum::<f32>() / stats.len() as f32,
                started.elapsed().as_secs_f64()
            );
        }
        if args.monitor_every > 0 && ((step + 1) % args.monitor_every == 0 || step + 1 == stage1_steps) {
            for (g, (count, ppl)) in monitor.run(&m, &aux)? {
                let what = if g == 0 { "other answers".to_string() } else { format!("chain answers, {g} steps") };
                let ppl: Vec<f64> = ppl.iter().map(|v| (v * 1000.0).round() / 1000.0).collect();
                eprintln!("  held-out after step {step}: {what} ({count} tokens): ppl per loop {ppl:?}");
            }
        }
        if (step + 1) % args.checkpoint_every == 0 || step + 1 == stage1_steps {
            save_checkpoint(&opt, step + 1, &rng)?;
        }
    }

    if let Some(p) = &args.save_stage1 {
        vm.save(p)?;
    }

    // Stage 2: the gate alone, on frozen states. Target at loop t < T-1: exit (1) when loop t+1
    // lowers the token's CE by less than gamma.
    let gate_vars: BTreeMap<String, Var> =
        vars.iter().filter(|(k, _)| k.starts_with("model.early_exit_gate.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    anyhow::ensure!(gate_vars.len() == 2, "gate parameters not found");
    // Stage 2 draws its own batches, so that `--load-stage1` reproduces a full run exactly.
    let mut rng = corpus::Rng::new(args.seed.wrapping_add(4));
    let mut gopt = optim::AdamW::new(&gate_vars, 1e-2, 0.0)?;
    for step in 0..args.gate_steps {
        let (x, y) = batch(&mut rng, usize::MAX)?;
        let (states, _) = m.forward(&x, &aux)?;
        let states: Vec<Tensor> = states.iter().map(|s| s.detach()).collect();
        let ce: Vec<Tensor> = states
            .iter()
            .map(|h| model::cross_entropy(&m.logits(h)?, &y).map(|c| c.detach()))
            .collect::<candle_core::Result<_>>()?;
        let mut loss = None;
        let mut exit_rate = vec![];
        for t in 0..LOOPS - 1 {
            let gain = (&ce[t] - &ce[t + 1])?;
            let target = gain.lt(args.gamma)?.to_dtype(DType::F32)?;
            exit_rate.push(target.mean_all()?.to_scalar::<f32>()?);
            let g = states[t].broadcast_matmul(&m.gate_w.t()?)?.squeeze(candle_core::D::Minus1)?.broadcast_add(&m.gate_b)?;
            let lam = model::sigmoid(&g)?;
            let bce = ((target.mul(&(lam.clone() + 1e-7)?.log()?)? + (target.neg()? + 1.0)?.mul(&(lam.neg()? + (1.0 + 1e-7))?.log()?)?)?.neg()?)
                .mean_all()?;
            loss = Some(match loss { None => bce, Some(a) => (a + bce)? });
        }
        let loss = loss.expect("loops");
        gopt.backward_step(&loss)?;
        if step % 50 == 0 || step + 1 == args.gate_steps {
            eprintln!("gate step {step:4} BCE {:.4} exit targets per loop {:?}", loss.to_scalar::<f32>()?, exit_rate);
        }
    }

    let probe: Vec<u32> = ids[..64].to_vec();
    let diff = check_against_runner(&m, &probe, &dev)?;
    eprintln!("trainer vs ouro-quant runner on the same f32 weights: max |diff| of logits and gate logits {diff:.2e}");
    anyhow::ensure!(diff < 1e-3, "the trainer's forward pass differs from the runner's by {diff}");

    // Write the checkpoint in the HF layout, bf16, into a temporary directory beside --out that
    // is renamed into place when whole.
    let pending = ouro_quant::output::PendingOutput::dir(&args.out, false)?;
    let out = pending.path();
    let named = model::named(&m);
    let specs: Vec<TensorSpec> = named
        .iter()
        .map(|(n, t)| TensorSpec { name: n.clone(), dtype: StDType::BF16, shape: t.dims().to_vec() })
        .collect();
    let mut w = Writer::new(out.join("model.safetensors"), specs, &BTreeMap::from([("format".to_string(), "pt".to_string())]))?;
    for (_, t) in &named {
        let v = model::to_dtype_vec(t)?;
        w.write(&v.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect::<Vec<u8>>())?;
    }
    w.finish()?;
    let mut cfg = ouro_quant::synth::preset_config(ouro_quant::synth::Preset::Tiny, Some(r.layers));
    let c = cfg.as_object_mut().expect("object");
    for (k, v) in [
        ("vocab_size", serde_json::json!(vocab)),
        ("hidden_size", serde_json::json!(r.hidden)),
        ("intermediate_size", serde_json::json!(r.inter)),
        ("num_attention_heads", serde_json::json!(r.heads)),
        ("num_key_value_heads", serde_json::json!(r.kv_heads)),
        ("head_dim", serde_json::json!(r.hidden / r.heads)),
        ("total_ut_steps", serde_json::json!(LOOPS)),
        ("rope_theta", serde_json::json!(10000.0)),
        ("max_position_embeddings", serde_json::json!(2048)),
        ("eos_token_id", serde_json::json!(2)),
        ("bos_token_id", serde_json::json!(1)),
        ("_name_or_path", serde_json::json!(r.name)),
    ] {
        c.insert(k.to_string(), v);
    }
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)? + "\n")?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tmp.path().join(f), out.join(f))?;
    }
    std::fs::write(out.join("validation.txt"), valid_lines.join("\n") + "\n")?;
    let out = pending.commit()?;
    eprintln!("wrote {} in {:.0} s", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{check_args, Command};

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_mistyped_or_valueless_option_stops_the_trainer() {
        let ok = args("--preset deep --out d --checkpoint c.ckpt --resume c.ckpt --monitor-every 100");
        assert_eq!(check_args(&ok).unwrap(), Command::Run);
        assert_eq!(check_args(&[]).unwrap(), Command::Run);
        assert_eq!(check_args(&args("--preset deep --help")).unwrap(), Command::Help);
        let e = check_args(&args("--preset deep --resum c.ckpt")).unwrap_err().to_string();
        assert!(e.starts_with("`--resum`: not an option") && e.contains("--resume"), "{e}");
        let e = check_args(&args("--preset deep --steps")).unwrap_err().to_string();
        assert_eq!(e, "`--steps` needs a value");
        let e = check_args(&args("--steps --resume c.ckpt")).unwrap_err().to_string();
        assert_eq!(e, "`--steps` needs a value");
        // a value without its option
        assert!(check_args(&args("deep")).unwrap_err().to_string().starts_with("`deep`: not an option"));
    }

    /// Every option the trainer reads (a quoted `--name` followed by `"` in this file, outside the
    /// tests) is in `OPTIONS`: the list and the reading cannot drift apart.
    #[test]
    fn every_option_read_is_known() {
        let src = include_str!("main.rs");
        let src = &src[..src.find("#[cfg(test)]").unwrap()];
        let mut read = vec![];
        for (i, _) in src.match_indices("\"--") {
            let name: String = src[i + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            if name.len() > 2 && src[i + 1 + name.len()..].starts_with('"') && name != "--help" {
                read.push(name);
            }
        }
        assert!(read.len() > 30, "{read:?}");
        for name in &read {
            assert!(super::OPTIONS.contains(&name.as_str()), "{name} is read but not in OPTIONS");
        }
    }
}
