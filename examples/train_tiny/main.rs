//! Trains the tiny Ouro of `fixtures/ouro-tiny-trained` (a development tool, not part of the CLI).
//!
//! cargo run --release --example train_tiny -- --out fixtures/ouro-tiny-trained
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
mod model;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use ouro_quant::stfile::{DType as StDType, TensorSpec, Writer};

struct Args {
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
}

fn parse_args() -> Args {
    let a: Vec<String> = std::env::args().collect();
    let get = |k: &str| a.iter().position(|x| x == k).and_then(|i| a.get(i + 1)).cloned();
    Args {
        out: PathBuf::from(get("--out").unwrap_or_else(|| "fixtures/ouro-tiny-trained".into())),
        seed: get("--seed").map_or(1, |s| s.parse().expect("--seed")),
        steps: get("--steps").map_or(1400, |s| s.parse().expect("--steps")),
        gate_steps: get("--gate-steps").map_or(200, |s| s.parse().expect("--gate-steps")),
        batch: get("--batch").map_or(16, |s| s.parse().expect("--batch")),
        seq: get("--seq").map_or(96, |s| s.parse().expect("--seq")),
        lr: get("--lr").map_or(3e-3, |s| s.parse().expect("--lr")),
        beta: get("--beta").map_or(0.1, |s| s.parse().expect("--beta")),
        beta_start: get("--beta-start").map_or(2.0, |s| s.parse().expect("--beta-start")),
        gamma: get("--gamma").map_or(0.005, |s| s.parse().expect("--gamma")),
        save_stage1: get("--save-stage1").map(PathBuf::from),
        load_stage1: get("--load-stage1").map(PathBuf::from),
    }
}

/// Fixed shapes of the fixture.
const HIDDEN: usize = 256;
const INTER: usize = 512;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LOOPS: usize = 4;
const VOCAB_TARGET: usize = 1024;
const PEOPLE: usize = 40;
const TRAIN_LINES: usize = 60_000;
const VALID_LINES: usize = 600;

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

/// `--tasks FILE [--seed S]`: the task file of answer-level validation (`validate --tasks`), 30
/// items of each question kind drawn from seed S + 5 (training used S + 1, validation S + 2).
fn write_tasks(path: &std::path::Path, seed: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let world = corpus::World::new(seed, PEOPLE);
    let mut f = std::fs::File::create_new(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for (prompt, answer, kind) in corpus::task_items(&world, seed.wrapping_add(5), 30) {
        let item = serde_json::json!({"prompt": prompt, "answer": answer, "kind": kind, "max_tokens": 8});
        writeln!(f, "{item}")?;
    }
    Ok(())
}

/// `--calibration FILE [--seed S]`: a calibration text for `imatrix`, as many lines as the
/// validation text, drawn from seed S + 6 (disjoint draws from validation's S + 2).
fn write_calibration(path: &std::path::Path, seed: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let world = corpus::World::new(seed, PEOPLE);
    let mut f = std::fs::File::create_new(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    f.write_all((corpus::lines(&world, seed.wrapping_add(6), VALID_LINES).join("\n") + "\n").as_bytes())?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if let Some(i) = std::env::args().position(|a| a == "--calibration") {
        let path = std::env::args().nth(i + 1).ok_or_else(|| anyhow::anyhow!("--calibration FILE"))?;
        return write_calibration(std::path::Path::new(&path), parse_args().seed);
    }
    if let Some(i) = std::env::args().position(|a| a == "--tasks") {
        let path = std::env::args().nth(i + 1).ok_or_else(|| anyhow::anyhow!("--tasks FILE"))?;
        return write_tasks(std::path::Path::new(&path), parse_args().seed);
    }
    if let Some(i) = std::env::args().position(|a| a == "--report") {
        let dir = std::env::args().nth(i + 1).ok_or_else(|| anyhow::anyhow!("--report DIR"))?;
        return report(std::path::Path::new(&dir));
    }
    let args = parse_args();
    let dev = Device::Cpu;
    let started = Instant::now();
    let world = corpus::World::new(args.seed, PEOPLE);
    let train_lines = corpus::lines(&world, args.seed.wrapping_add(1), TRAIN_LINES);
    let valid_lines = corpus::lines(&world, args.seed.wrapping_add(2), VALID_LINES);

    // Tokenizer, trained on the training text only.
    let tmp = tempfile::tempdir()?;
    let refs: Vec<&str> = train_lines.iter().map(String::as_str).collect();
    ouro_quant::synth::train_tokenizer(tmp.path(), VOCAB_TARGET, &refs)?;
    let tok = tokenizers::Tokenizer::from_file(tmp.path().join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    let vocab = tok.get_vocab_size(true);
    let train_text = train_lines.join("\n") + "\n";
    let ids: Vec<u32> = tok.encode(train_text.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec();
    eprintln!("corpus: {} training lines, {} tokens, vocab {vocab}", train_lines.len(), ids.len());

    let d = model::Dims {
        vocab,
        hidden: HIDDEN,
        inter: INTER,
        layers: LAYERS,
        heads: HEADS,
        kv_heads: KV_HEADS,
        loops: LOOPS,
        eps: 1e-6,
        theta: 10000.0,
    };
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let m = model::Model::new(d, &vb)?;
    let n_params: usize = model::named(&m).iter().map(|(_, t)| t.elem_count()).sum();
    eprintln!("model: {n_params} parameters");
    let aux = model::aux(&d, args.seq, &dev)?;

    // Deterministic batches: random windows of the token stream.
    let mut rng = corpus::Rng::new(args.seed.wrapping_add(3));
    let batch = |rng: &mut corpus::Rng| -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = Vec::with_capacity(args.batch * args.seq);
        let mut y = Vec::with_capacity(args.batch * args.seq);
        for _ in 0..args.batch {
            let s = rng.below(ids.len() - args.seq - 1);
            x.extend_from_slice(&ids[s..s + args.seq]);
            y.extend_from_slice(&ids[s + 1..s + args.seq + 1]);
        }
        Ok((Tensor::from_vec(x, (args.batch, args.seq), &dev)?, Tensor::from_vec(y, (args.batch, args.seq), &dev)?))
    };

    // Stage 1: everything, expected CE under the exit distribution + beta * KL(p || uniform).
    let params = ParamsAdamW { lr: args.lr, weight_decay: 0.01, ..Default::default() };
    let mut opt = AdamW::new(vm.all_vars(), params)?;
    let log_t = (LOOPS as f64).ln();
    let mut vm = vm;
    let stage1_steps = if let Some(p) = &args.load_stage1 {
        vm.load(p)?;
        eprintln!("stage 1 weights loaded from {}", p.display());
        0
    } else {
        args.steps
    };
    for step in 0..stage1_steps {
        let warm = 100.min(args.steps / 10).max(1);
        let lr = if step < warm {
            args.lr * (step + 1) as f64 / warm as f64
        } else {
            let p = (step - warm) as f64 / (args.steps - warm).max(1) as f64;
            args.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
        };
        opt.set_learning_rate(lr);
        let beta = args.beta_start + (args.beta - args.beta_start) * step as f64 / (args.steps.max(2) - 1) as f64;
        let (x, y) = batch(&mut rng)?;
        let (states, gates) = m.forward(&x, &aux)?;
        let pdf = model::exit_pdf(&gates)?;
        let mut expected = None;
        let mut neg_entropy = None;
        let mut per_loop = vec![];
        for (t, h) in states.iter().enumerate() {
            let ce = model::cross_entropy(&m.logits(h)?, &y)?;
            per_loop.push(ce.mean_all()?.to_scalar::<f32>()?);
            let e = pdf[t].mul(&ce)?;
            let n = pdf[t].mul(&(pdf[t].clone() + 1e-9)?.log()?)?;
            expected = Some(match expected { None => e, Some(a) => (a + e)? });
            neg_entropy = Some(match neg_entropy { None => n, Some(a) => (a + n)? });
        }
        let kl = (neg_entropy.expect("loops").mean_all()? + log_t)?;
        let loss = (expected.expect("loops").mean_all()? + (kl.clone() * beta)?)?;
        opt.backward_step(&loss)?;
        if step % 50 == 0 || step + 1 == args.steps {
            let mean_p: Vec<f32> = pdf.iter().map(|p| p.mean_all().and_then(|v| v.to_scalar::<f32>()).unwrap_or(f32::NAN)).collect();
            eprintln!(
                "step {step:5} lr {lr:.2e} beta {beta:.2} loss {:.4} CE per loop {:?} mean p {:?} KL {:.3} ({:.0} s)",
                loss.to_scalar::<f32>()?,
                per_loop.iter().map(|v| (v * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
                mean_p.iter().map(|v| (v * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
                kl.to_scalar::<f32>()?,
                started.elapsed().as_secs_f64()
            );
        }
    }

    if let Some(p) = &args.save_stage1 {
        vm.save(p)?;
    }

    // Stage 2: the gate alone, on frozen states. Target at loop t < T-1: exit (1) when loop t+1
    // lowers the token's CE by less than gamma.
    let gate_vars: Vec<Var> = {
        let data = vm.data().lock().expect("varmap");
        ["model.early_exit_gate.weight", "model.early_exit_gate.bias"].iter().map(|k| data[*k].clone()).collect()
    };
    // Stage 2 draws its own batches, so that `--load-stage1` reproduces a full run exactly.
    let mut rng = corpus::Rng::new(args.seed.wrapping_add(4));
    let mut gopt = AdamW::new(gate_vars, ParamsAdamW { lr: 1e-2, weight_decay: 0.0, ..Default::default() })?;
    for step in 0..args.gate_steps {
        let (x, y) = batch(&mut rng)?;
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

    // Write the checkpoint in the HF layout, bf16.
    let out = &args.out;
    std::fs::create_dir_all(out)?;
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
    let mut cfg = ouro_quant::synth::preset_config(ouro_quant::synth::Preset::Tiny, Some(LAYERS));
    let c = cfg.as_object_mut().expect("object");
    for (k, v) in [
        ("vocab_size", serde_json::json!(vocab)),
        ("hidden_size", serde_json::json!(HIDDEN)),
        ("intermediate_size", serde_json::json!(INTER)),
        ("num_attention_heads", serde_json::json!(HEADS)),
        ("num_key_value_heads", serde_json::json!(KV_HEADS)),
        ("head_dim", serde_json::json!(HIDDEN / HEADS)),
        ("total_ut_steps", serde_json::json!(LOOPS)),
        ("rope_theta", serde_json::json!(10000.0)),
        ("max_position_embeddings", serde_json::json!(2048)),
        ("eos_token_id", serde_json::json!(2)),
        ("bos_token_id", serde_json::json!(1)),
        ("_name_or_path", serde_json::json!("ouro-tiny-trained")),
    ] {
        c.insert(k.to_string(), v);
    }
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)? + "\n")?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tmp.path().join(f), out.join(f))?;
    }
    std::fs::write(out.join("validation.txt"), valid_lines.join("\n") + "\n")?;
    eprintln!("wrote {} in {:.0} s", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}
