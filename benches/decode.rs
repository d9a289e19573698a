//! Prefill and decode speed of the runner beside the memory-bandwidth bound measured in the same
//! run, on a `synth --preset ouro-1.4b` checkpoint (made under target/bench/ if no model is given).
//!
//! cargo bench --bench decode -- [--model DIR] [--gguf A.gguf,B.gguf] [--mlx DIR,DIR] [--skip-hf]
//!                                [--prompt N] [--decode N] [--thresholds 0.5,0.9] [--repeat N]
//!                                [--llama-bench PATH]
//!
//! `--llama-bench PATH` (a llama.cpp `llama-bench` binary) also times llama.cpp on each GGUF file,
//! interleaved with ours (ours, then llama.cpp, in every repeat), at all loops, with the same
//! threads and prompt and decode lengths, and prints both and the ratio. A llama.cpp build with
//! the community `ouro` port runs the file itself when `--llama-ouro` is given too; stock llama.cpp
//! runs a stand-in written once beside the file by `scripts/ouro_as_llama.py` (a `llama` model
//! whose blocks are the Ouro stack once per loop, copies of the same bytes: the same matrix
//! products on the same data, the same bytes read per token; docs/performance.md says what it
//! leaves out).
//!
//! The bound: decode must read every projection once per loop (and the lm_head once per token), so
//! tokens/s <= memcpy bandwidth / those bytes. The memory bandwidth of a shared machine drifts
//! (this VM's memcpy moved between 33 and 45 GB/s within an hour), so each run's bound is the
//! memcpy bandwidth measured just before it, and `--repeat N` runs each row N times and reports
//! the median with the range of the percentages.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use ouro_quant::model::generate::{generate, GenerateOptions, Sampling};
use ouro_quant::model::KvPolicy;
use ouro_quant::synth::{synth, Preset, SynthOptions};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// Memory traffic per second (bytes read + bytes written) of a 1 GiB memcpy spread over the rayon
/// threads, best of 5.
fn memcpy_bandwidth(src: &[u8], dst: &mut [u8]) -> f64 {
    use rayon::prelude::*;
    let n = src.len();
    let chunk = n / rayon::current_num_threads().max(1);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&*dst);
    }
    2.0 * n as f64 / best
}

/// llama.cpp's prefill and decode tokens/s on `gguf` (one `llama-bench` repetition).
fn llama_bench(bin: &str, gguf: &std::path::Path, prompt: usize, decode: usize) -> anyhow::Result<(f64, f64)> {
    let out = std::process::Command::new(bin)
        .arg("-m")
        .arg(gguf)
        .args(["-p", &prompt.to_string(), "-n", &decode.to_string(), "-t", &rayon::current_num_threads().to_string(), "-r", "1", "-o", "json"])
        .output()?;
    anyhow::ensure!(out.status.success(), "{bin} on {}: {}", gguf.display(), String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rate = |key: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|e| e[key].as_u64().is_some_and(|n| n > 0) && e[if key == "n_prompt" { "n_gen" } else { "n_prompt" }] == 0))
            .and_then(|e| e["avg_ts"].as_f64())
            .ok_or_else(|| anyhow::anyhow!("llama-bench printed no {key} test"))
    };
    Ok((rate("n_prompt")?, rate("n_gen")?))
}

/// The GGUF file llama.cpp runs for `gguf`: the file itself with `--llama-ouro`, else the stock
/// llama stand-in beside it (written once by scripts/ouro_as_llama.py).
fn llama_input(gguf: &std::path::Path) -> anyhow::Result<PathBuf> {
    if flag("--llama-ouro") {
        return Ok(gguf.to_path_buf());
    }
    let stand_in = gguf.with_extension("llama-stand-in.gguf");
    if !stand_in.exists() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let py = std::env::var("OURO_QUANT_PYTHON").unwrap_or_else(|_| root.join("target/oracle-venv/bin/python").display().to_string());
        let st = std::process::Command::new(&py).arg(root.join("scripts/ouro_as_llama.py")).arg(gguf).arg(&stand_in).status()?;
        anyhow::ensure!(st.success(), "scripts/ouro_as_llama.py ({py}) failed on {}", gguf.display());
    }
    Ok(stand_in)
}

fn main() -> anyhow::Result<()> {
    println!("{}", common::cpu_line());
    let model_dir = match arg("--model") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/ouro-1.4b");
            // made only for the HF row (not with --skip-hf)
            if !p.exists() && !flag("--skip-hf") {
                std::fs::create_dir_all(p.parent().unwrap())?;
                eprintln!("synthesizing {} ...", p.display());
                let o = SynthOptions { preset: Preset::Ouro1_4b, layers: None, seed: 0, dtype: ouro_quant::stfile::DType::BF16, shards: 1 };
                synth(&o, &p, false, &|_, _| {})?;
            }
            p
        }
    };
    let prompt_len: usize = arg("--prompt").map_or(Ok(64), |s| s.parse())?;
    let decode_len: usize = arg("--decode").map_or(Ok(8), |s| s.parse())?;
    let thresholds: Vec<f32> = arg("--thresholds")
        .unwrap_or_else(|| "0.5".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;

    let repeat: usize = arg("--repeat").map_or(Ok(1), |s| s.parse())?;
    let (src_buf, mut dst_buf) = (vec![1u8; 1 << 30], vec![0u8; 1 << 30]);
    let bw = memcpy_bandwidth(&src_buf, &mut dst_buf);
    println!("threads: {} (rayon); memcpy bandwidth (read + write) {:.2} GB/s; read-only {:.2} GB/s", rayon::current_num_threads(), bw / 1e9, common::read_bandwidth() / 1e9);
    let mut sources: Vec<PathBuf> = vec![];
    if !flag("--skip-hf") {
        sources.push(model_dir.clone());
    }
    for list in ["--gguf", "--mlx"] {
        if let Some(g) = arg(list) {
            sources.extend(g.split(',').map(PathBuf::from));
        }
    }
    let llama = arg("--llama-bench");
    let mut versus = vec![];
    let prompt: Vec<u32> = (0..prompt_len).map(|i| (3 + i * 7919 % 40000) as u32).collect();
    println!("| weights | exit | prefill tok/s | decode tok/s | % of bound | loops/token | GB read per token | memcpy GB/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for src in sources {
        let t = Instant::now();
        let loaded = ouro_quant::model::source::load(&src, &Device::Cpu)?;
        let model = loaded.model;
        eprintln!("{} loaded in {:.1} s", loaded.description, t.elapsed().as_secs_f64());
        let bytes_per_token = (model.layer_bytes * model.dims.loops as u64 + model.lm_head_bytes) as f64;
        let name = src.file_name().unwrap().to_string_lossy().into_owned();
        let label = match () {
            _ if src.is_file() => name,
            _ if ouro_quant::mlx::read::is_mlx_dir(&src) => format!("MLX {name}"),
            _ if src == model_dir => "HF bf16".to_string(),
            _ => format!("HF {name}"),
        };
        let mut run = |q: Option<f32>| -> anyhow::Result<()> {
            let opts = GenerateOptions {
                max_tokens: decode_len + 1,
                sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 },
                exit_threshold: q,
                readout: None,
                kv: KvPolicy::Full,
                kv_fill: ouro_quant::model::SkipFill::Copy,
                kv_dtype: candle_core::DType::F32,
                stop_ids: vec![],
            };
            // per run: (prefill, decode, % of the bound measured just before, memcpy, loops)
            let mut runs = vec![];
            // llama.cpp beside ours at all loops: (ours prefill, decode, llama.cpp prefill, decode)
            let beside = match &llama {
                Some(bin) if q.is_none() && src.is_file() => Some((bin, llama_input(&src)?)),
                _ => None,
            };
            let mut pairs = vec![];
            for _ in 0..repeat {
                let bw = memcpy_bandwidth(&src_buf, &mut dst_buf);
                let s = generate(&model, &prompt, &opts, &mut |_| {})?.stats;
                let pct = 100.0 * s.decode_tokens_per_s * bytes_per_token / bw;
                runs.push((s.prefill_tokens_per_s, s.decode_tokens_per_s, pct, bw / 1e9, s.mean_loops_per_token));
                if let Some((bin, file)) = &beside {
                    let (lp, ld) = llama_bench(bin, file, prompt_len, decode_len)?;
                    pairs.push([s.prefill_tokens_per_s, s.decode_tokens_per_s, lp, ld]);
                }
            }
            if !pairs.is_empty() {
                versus.push((label.clone(), pairs));
            }
            // (median, min, max) of one figure over the runs
            let spread = |f: &dyn Fn(&(f64, f64, f64, f64, f64)) -> f64| {
                let mut v: Vec<f64> = runs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                (v[v.len() / 2], v[0], v[v.len() - 1])
            };
            let (pct, lo, hi) = spread(&|r| r.2);
            let range = if repeat > 1 { format!(" ({lo:.0}-{hi:.0}%)") } else { String::new() };
            println!(
                "| {label} | {} | {:.2} | {:.3} | {:.0}%{range} | {:.2} | {:.2} | {:.1} |",
                q.map_or("all loops".to_string(), |q| format!("q={q}")),
                spread(&|r| r.0).0,
                spread(&|r| r.1).0,
                pct,
                spread(&|r| r.4).0,
                bytes_per_token / 1e9,
                spread(&|r| r.3).0,
            );
            Ok(())
        };
        run(None)?;
        for &q in &thresholds {
            run(Some(q))?;
        }
    }
    if !versus.is_empty() {
        let what = if flag("--llama-ouro") { "the file itself" } else { "its stock-llama stand-in" };
        println!("\nllama.cpp ({}) on {what}, interleaved with ours, all loops, {} threads; median (range) of {repeat}:", llama.as_deref().unwrap_or(""), rayon::current_num_threads());
        println!("| weights | ours prefill | llama.cpp prefill | ratio | ours decode | llama.cpp decode | ratio |");
        println!("|---|---|---|---|---|---|---|");
        for (label, pairs) in versus {
            let col = |i: usize| {
                let mut v: Vec<f64> = pairs.iter().map(|p| p[i]).collect();
                v.sort_by(f64::total_cmp);
                (v[v.len() / 2], v[0], v[v.len() - 1])
            };
            let cell = |(m, lo, hi): (f64, f64, f64)| if pairs.len() > 1 { format!("{m:.2} ({lo:.2}-{hi:.2})") } else { format!("{m:.2}") };
            // the ratio of each interleaved pair, so a drift of the machine's speed cancels
            let ratio = |a: usize, b: usize| {
                let mut v: Vec<f64> = pairs.iter().map(|p| p[a] / p[b]).collect();
                v.sort_by(f64::total_cmp);
                if v.len() > 1 { format!("{:.2}x ({:.2}-{:.2})", v[v.len() / 2], v[0], v[v.len() - 1]) } else { format!("{:.2}x", v[0]) }
            };
            println!("| {label} | {} | {} | {} | {} | {} | {} |", cell(col(0)), cell(col(2)), ratio(0, 2), cell(col(1)), cell(col(3)), ratio(1, 3));
        }
    }
    Ok(())
}
