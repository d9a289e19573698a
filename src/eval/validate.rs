//! `ouro-quant validate`: a reference and a candidate model over the same chunks of a text, compared
//! per loop, in the default mode, and in their exit behaviour, with a pass/fail verdict.
//!
//! The reference side of every chunk is reduced to a compact form (each loop's log-probabilities
//! rounded to f16, and the gate logits), which is what `--save-reference` stores; the candidate's
//! log-probabilities go through the same rounding. Metrics are always computed from these, so a
//! stored reference gives exactly the numbers of a fresh run, and a model compared with itself
//! gives a ratio of exactly 1 and a KL divergence of exactly 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::f16;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::chunks;
use crate::model::exit::{exit_pdf, sigmoid, threshold_exit};
use crate::model::{LoopOutputs, OuroModel};
use crate::stfile::{DType, SafetensorsFile, TensorSpec, Writer};

/// Format tag of a stored reference.
const REF_FORMAT: &str = "ouro-quant-reference-1";

/// One model's compact outputs for the scored positions of one chunk.
#[derive(Debug, Clone)]
pub struct ChunkSide {
    /// `[n][T][V]` log-probabilities, rounded to f16.
    pub logprobs: Vec<f16>,
    /// `[n][T]` gate logits.
    pub gates: Vec<f32>,
}

fn log_softmax_f16(logits: &[f32], out: &mut Vec<f16>) {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    let lse = m + s.ln();
    out.extend(logits.iter().map(|&x| f16::from_f64(x as f64 - lse)));
}

/// The compact side of a chunk from a model's full outputs (`first..len-1` are scored).
pub fn chunk_side(lo: &LoopOutputs, first: usize, last: usize) -> ChunkSide {
    let v = lo.vocab;
    let t_max = lo.step_logits.len();
    let mut logprobs = Vec::with_capacity((last - first) * t_max * v);
    let mut gates = Vec::with_capacity((last - first) * t_max);
    for j in first..last {
        for t in 0..t_max {
            log_softmax_f16(&lo.step_logits[t][j * v..(j + 1) * v], &mut logprobs);
            gates.push(lo.gate_logits[t][j]);
        }
    }
    ChunkSide { logprobs, gates }
}

/// SHA-256 identifying a model: of the file, or over a directory's config.json and weight files.
pub fn model_hash(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut files: Vec<PathBuf> = if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                n == "config.json" || (n.starts_with("model") && n.ends_with(".safetensors"))
            })
            .collect();
        v.sort();
        v
    };
    files.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    for f in &files {
        h.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        let mut r = std::fs::File::open(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Where the reference side comes from.
pub enum ReferenceSource<'a> {
    /// Run the model (and optionally store what it produced).
    Model { model: &'a OuroModel, hash: String, save: Option<PathBuf> },
    /// A stored reference.
    Stored(PathBuf),
}

/// Options of a validation.
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    pub ctx: usize,
    pub chunks: Option<usize>,
    pub thresholds: Vec<f32>,
}

/// Per-loop comparison.
#[derive(Debug, Clone, Serialize)]
pub struct LoopMetrics {
    /// 1-based loop, or 0 for the default mode.
    pub loop_index: usize,
    pub ppl_reference: f64,
    pub ppl_candidate: f64,
    pub ppl_ratio: f64,
    /// Standard error of the ratio (delta method on per-token log-ratios).
    pub ppl_ratio_se: f64,
    pub ppl_difference: f64,
    pub kl_mean: f64,
    pub kl_median: f64,
    pub kl_p99: f64,
    pub kl_max: f64,
    /// Share of tokens whose most likely next token is the same, in percent (llama.cpp's "same
    /// top p": near-ties of the reference count too, where any pick is as good as another).
    pub same_top_token_pct: f64,
    /// Share of tokens on which the reference has decided: its most likely next token at least
    /// [`DECIDED_RATIO`] times as likely as its runner-up, in percent.
    pub decided_tokens_pct: f64,
    /// Among the decided tokens, the share whose most likely next token is the same, in percent
    /// (100 where the reference decided none). This is what the verdict checks.
    pub same_top_decided_pct: f64,
    /// RMS of the change in the probability of the reference's top token.
    pub top_token_prob_change_rms: f64,
}

/// Exit behaviour at one threshold q.
#[derive(Debug, Clone, Serialize)]
pub struct ExitMetrics {
    pub q: f32,
    /// Tokens exiting at each loop (index 0 = loop 1).
    pub histogram_reference: Vec<usize>,
    pub histogram_candidate: Vec<usize>,
    /// Share of tokens with the same exit loop, in percent.
    pub exit_agreement_pct: f64,
    pub mean_exit_loop_reference: f64,
    pub mean_exit_loop_candidate: f64,
    pub mean_exit_loop_change: f64,
    /// Mean |lambda_ref - lambda_cand| per loop (the gate's exit probability).
    pub mean_abs_lambda_change: Vec<f64>,
    /// Mean total-variation distance between the exit distributions.
    pub exit_tv_distance: f64,
    /// Perplexity when every token reads out its own exit loop at this q.
    pub ppl_at_exit_reference: f64,
    pub ppl_at_exit_candidate: f64,
}

/// Everything `validate` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ValidateReport {
    pub schema: &'static str,
    pub reference: String,
    pub candidate: String,
    pub text: String,
    pub text_sha256: String,
    pub reference_sha256: String,
    pub ctx: usize,
    pub chunks: usize,
    pub scored_tokens: usize,
    /// The config's default q (`early_exit_threshold`).
    pub default_threshold: f32,
    pub default_mode: LoopMetrics,
    pub per_loop: Vec<LoopMetrics>,
    pub exits: Vec<ExitMetrics>,
    pub seconds_reference: f64,
    pub seconds_candidate: f64,
    pub tokens_per_s_reference: f64,
    pub tokens_per_s_candidate: f64,
    pub reference_stored: bool,
    /// Answer-level results (`validate --tasks`), else null.
    pub tasks: Option<super::tasks::TaskReport>,
}

/// How much more likely than its runner-up the reference's top token must be for the token to count
/// as decided in `same_top_decided_pct`. Below it the reference's choice is a near tie (a uniform
/// draw predicted flat, a synonym): reordering it costs the candidate almost nothing in perplexity
/// or KL, yet the plain same-top share counts it as a miss. Twice as likely (a log-odds gap of
/// ln 2 = 0.69) is far above what the f16 rounding of the log-probabilities (1e-3 near 0) moves.
pub const DECIDED_RATIO: f64 = 2.0;

/// Accumulates per-token comparisons of one readout (a loop or the default mode).
#[derive(Default)]
struct LoopAcc {
    nll_r: Vec<f64>,
    nll_c: Vec<f64>,
    kl: Vec<f64>,
    same_top: usize,
    decided: usize,
    same_top_decided: usize,
    dp2: f64,
}

impl LoopAcc {
    fn add(&mut self, r: &[f16], c: &[f16], target: usize) {
        self.nll_r.push(-r[target].to_f64());
        self.nll_c.push(-c[target].to_f64());
        let mut kl = 0.0;
        let (mut ar, mut ac) = (0usize, 0usize);
        // the reference's runner-up log-probability (the first index wins ties, as for the top)
        let mut second = f64::NEG_INFINITY;
        for i in 0..r.len() {
            let (lr, lc) = (r[i].to_f64(), c[i].to_f64());
            if lr > r[ar].to_f64() {
                second = r[ar].to_f64();
                ar = i;
            } else if i != ar && lr > second {
                second = lr;
            }
            if lc > c[ac].to_f64() {
                ac = i;
            }
            let p = lr.exp();
            if p > 0.0 {
                kl += p * (lr - lc);
            }
        }
        self.kl.push(kl.max(0.0));
        self.same_top += usize::from(ar == ac);
        if r[ar].to_f64() - second >= DECIDED_RATIO.ln() {
            self.decided += 1;
            self.same_top_decided += usize::from(ar == ac);
        }
        self.dp2 += (r[ar].to_f64().exp() - c[ar].to_f64().exp()).powi(2);
    }

    fn finish(mut self, loop_index: usize) -> LoopMetrics {
        let n = self.nll_r.len() as f64;
        let mr = self.nll_r.iter().sum::<f64>() / n;
        let mc = self.nll_c.iter().sum::<f64>() / n;
        let d: Vec<f64> = self.nll_c.iter().zip(&self.nll_r).map(|(c, r)| c - r).collect();
        let md = d.iter().sum::<f64>() / n;
        let vd = d.iter().map(|x| (x - md).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let ratio = md.exp();
        self.kl.sort_by(|a, b| a.total_cmp(b));
        let q = |f: f64| self.kl[((f * (n - 1.0)).round() as usize).min(self.kl.len() - 1)];
        LoopMetrics {
            loop_index,
            ppl_reference: mr.exp(),
            ppl_candidate: mc.exp(),
            ppl_ratio: ratio,
            ppl_ratio_se: ratio * (vd / n).sqrt(),
            ppl_difference: mc.exp() - mr.exp(),
            kl_mean: self.kl.iter().sum::<f64>() / n,
            kl_median: q(0.5),
            kl_p99: q(0.99),
            kl_max: *self.kl.last().unwrap_or(&0.0),
            same_top_token_pct: 100.0 * self.same_top as f64 / n,
            decided_tokens_pct: 100.0 * self.decided as f64 / n,
            same_top_decided_pct: if self.decided == 0 { 100.0 } else { 100.0 * self.same_top_decided as f64 / self.decided as f64 },
            top_token_prob_change_rms: (self.dp2 / n).sqrt(),
        }
    }
}

#[derive(Default)]
struct ExitAcc {
    hist_r: Vec<usize>,
    hist_c: Vec<usize>,
    agree: usize,
    dlam: Vec<f64>,
    tv: f64,
    nll_r: f64,
    nll_c: f64,
    n: usize,
}

/// A stored reference file, opened.
struct Stored {
    file: SafetensorsFile,
    per_chunk: usize,
    loops: usize,
    vocab: usize,
}

fn text_hash(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares `candidate` with the reference over `tokens`. `progress(done, total)` per chunk.
#[allow(clippy::too_many_arguments)]
pub fn validate(
    reference: ReferenceSource,
    reference_name: &str,
    candidate: &OuroModel,
    candidate_name: &str,
    tokens: &[u32],
    text_name: &str,
    opts: &ValidateOptions,
    progress: &dyn Fn(usize, usize),
) -> anyhow::Result<ValidateReport> {
    let spans = chunks(tokens.len(), opts.ctx, opts.chunks);
    anyhow::ensure!(opts.ctx >= 8, "--ctx {}: at least 8 tokens", opts.ctx);
    anyhow::ensure!(!spans.is_empty(), "{text_name}: the text has {} tokens, fewer than one chunk of --ctx {}", tokens.len(), opts.ctx);
    let t_max = candidate.dims.loops;
    let vocab = candidate.dims.vocab;
    let first = opts.ctx / 2;
    let per_chunk = opts.ctx - 1 - first;
    let thash = text_hash(tokens);

    // The reference: a model to run (maybe saving its side), or a stored file to read.
    let (ref_model, ref_hash, mut saver, stored) = match &reference {
        ReferenceSource::Model { model, hash, save } => {
            let (r, c) = (&model.dims, &candidate.dims);
            let differ: Vec<String> = [
                ("vocabulary", r.vocab, c.vocab),
                ("loops", r.loops, c.loops),
                ("layers", r.layers, c.layers),
                ("hidden size", r.hidden, c.hidden),
                ("attention heads", r.heads, c.heads),
                ("KV heads", r.kv_heads, c.kv_heads),
                ("head dim", r.head_dim, c.head_dim),
            ]
            .iter()
            .filter(|(_, a, b)| a != b)
            .map(|(what, a, b)| format!("{what} {b} (reference {a})"))
            .collect();
            anyhow::ensure!(
                differ.is_empty(),
                "{candidate_name}: not a conversion of the reference {reference_name}: {}",
                differ.join(", ")
            );
            let saver = match save {
                Some(p) => Some(start_reference_file(p, hash, &thash, opts, spans.len(), per_chunk, t_max, vocab, model)?),
                None => None,
            };
            (Some(*model), hash.clone(), saver, None)
        }
        ReferenceSource::Stored(p) => {
            let s = open_reference_file(p, &thash, opts, spans.len(), per_chunk, t_max, vocab)?;
            let h = s.file.header().metadata.get("model_sha256").cloned().unwrap_or_default();
            (None, h, None, Some(s))
        }
    };
    let default_q = match (&reference, ref_model) {
        (_, Some(m)) => m.config.early_exit_threshold.unwrap_or(1.0) as f32,
        (ReferenceSource::Stored(_), _) => stored
            .as_ref()
            .and_then(|s| s.file.header().metadata.get("default_threshold").and_then(|v| v.parse().ok()))
            .unwrap_or(1.0),
        _ => 1.0,
    };

    let mut loops: Vec<LoopAcc> = (0..t_max).map(|_| LoopAcc::default()).collect();
    let mut default = LoopAcc::default();
    let mut exits: Vec<ExitAcc> = opts
        .thresholds
        .iter()
        .map(|_| ExitAcc { hist_r: vec![0; t_max], hist_c: vec![0; t_max], dlam: vec![0.0; t_max], ..Default::default() })
        .collect();
    let (mut secs_r, mut secs_c) = (0.0f64, 0.0f64);
    for (ci, &(start, len)) in spans.iter().enumerate() {
        let chunk = &tokens[start..start + len];
        let t0 = std::time::Instant::now();
        let r = match (ref_model, &stored) {
            (Some(m), _) => {
                let lo = LoopOutputs::new(m, &m.forward_full(chunk, crate::model::KvPolicy::Full)?)?;
                let side = chunk_side(&lo, first, len - 1);
                if let Some(w) = saver.as_mut() {
                    w.write(&side.logprobs.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect::<Vec<u8>>())?;
                }
                side
            }
            (None, Some(s)) => read_chunk(s, ci),
            _ => unreachable!("one reference source"),
        };
        secs_r += t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let lo = LoopOutputs::new(candidate, &candidate.forward_full(chunk, crate::model::KvPolicy::Full)?)?;
        let c = chunk_side(&lo, first, len - 1);
        secs_c += t1.elapsed().as_secs_f64();
        if let Some(w) = saver.as_mut() {
            // gate logits follow all log-probs in the file: kept until the end
            w.defer_gates(&r.gates);
        }
        let stride = t_max * vocab;
        for k in 0..per_chunk {
            let target = chunk[first + k + 1] as usize;
            let rg = &r.gates[k * t_max..(k + 1) * t_max];
            let cg = &c.gates[k * t_max..(k + 1) * t_max];
            let (pr, pc) = (exit_pdf(rg), exit_pdf(cg));
            let at = |t: usize| k * stride + t * vocab;
            for t in 0..t_max {
                loops[t].add(&r.logprobs[at(t)..at(t) + vocab], &c.logprobs[at(t)..at(t) + vocab], target);
            }
            let (er, ec) = (threshold_exit(&pr, default_q), threshold_exit(&pc, default_q));
            default.add(&r.logprobs[at(er)..at(er) + vocab], &c.logprobs[at(ec)..at(ec) + vocab], target);
            for (e, &q) in exits.iter_mut().zip(&opts.thresholds) {
                let (xr, xc) = (threshold_exit(&pr, q), threshold_exit(&pc, q));
                e.hist_r[xr] += 1;
                e.hist_c[xc] += 1;
                e.agree += usize::from(xr == xc);
                for t in 0..t_max {
                    e.dlam[t] += (sigmoid(rg[t]) as f64 - sigmoid(cg[t]) as f64).abs();
                }
                e.tv += 0.5 * pr.iter().zip(&pc).map(|(a, b)| (a - b).abs() as f64).sum::<f64>();
                e.nll_r -= r.logprobs[at(xr) + target].to_f64();
                e.nll_c -= c.logprobs[at(xc) + target].to_f64();
                e.n += 1;
            }
        }
        progress(ci + 1, spans.len());
    }
    if let Some(w) = saver.take() {
        w.finish()?;
    }
    let n = spans.len() * per_chunk;
    let mean_loop = |h: &[usize]| h.iter().enumerate().map(|(t, &c)| (t + 1) as f64 * c as f64).sum::<f64>() / n as f64;
    Ok(ValidateReport {
        schema: "ouro-quant-validate-1",
        reference: reference_name.into(),
        candidate: candidate_name.into(),
        text: text_name.into(),
        text_sha256: thash,
        reference_sha256: ref_hash,
        ctx: opts.ctx,
        chunks: spans.len(),
        scored_tokens: n,
        default_threshold: default_q,
        default_mode: default.finish(0),
        per_loop: loops.into_iter().enumerate().map(|(t, a)| a.finish(t + 1)).collect(),
        exits: exits
            .into_iter()
            .zip(&opts.thresholds)
            .map(|(e, &q)| ExitMetrics {
                q,
                exit_agreement_pct: 100.0 * e.agree as f64 / n as f64,
                mean_exit_loop_reference: mean_loop(&e.hist_r),
                mean_exit_loop_candidate: mean_loop(&e.hist_c),
                mean_exit_loop_change: mean_loop(&e.hist_c) - mean_loop(&e.hist_r),
                mean_abs_lambda_change: e.dlam.iter().take(t_max - 1).map(|d| d / n as f64).collect(),
                exit_tv_distance: e.tv / n as f64,
                ppl_at_exit_reference: (e.nll_r / e.n as f64).exp(),
                ppl_at_exit_candidate: (e.nll_c / e.n as f64).exp(),
                histogram_reference: e.hist_r,
                histogram_candidate: e.hist_c,
            })
            .collect(),
        seconds_reference: secs_r,
        seconds_candidate: secs_c,
        tokens_per_s_reference: (spans.len() * opts.ctx) as f64 / secs_r.max(1e-9),
        tokens_per_s_candidate: (spans.len() * opts.ctx) as f64 / secs_c.max(1e-9),
        reference_stored: stored.is_some(),
        tasks: None,
    })
}

/// Streams a reference file: all chunks' log-probs, then (at the end) the gate logits.
struct ReferenceWriter {
    writer: Writer,
    gates: Vec<f32>,
}

impl ReferenceWriter {
    fn write(&mut self, bytes: &[u8]) -> crate::Result<()> {
        self.writer.write(bytes)
    }
    fn defer_gates(&mut self, g: &[f32]) {
        self.gates.extend_from_slice(g);
    }
    fn finish(mut self) -> crate::Result<()> {
        let g: Vec<u8> = self.gates.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.writer.write(&g)?;
        self.writer.finish().map(|_| ())
    }
}

#[allow(clippy::too_many_arguments)]
fn start_reference_file(
    path: &Path,
    model_hash: &str,
    text_hash: &str,
    opts: &ValidateOptions,
    n_chunks: usize,
    per_chunk: usize,
    loops: usize,
    vocab: usize,
    model: &OuroModel,
) -> anyhow::Result<ReferenceWriter> {
    let n = n_chunks * per_chunk;
    let specs = vec![
        TensorSpec { name: "logprobs".into(), dtype: DType::F16, shape: vec![n, loops, vocab] },
        TensorSpec { name: "gate_logits".into(), dtype: DType::F32, shape: vec![n, loops] },
    ];
    let meta: BTreeMap<String, String> = [
        ("format", REF_FORMAT.to_string()),
        ("model_sha256", model_hash.to_string()),
        ("text_sha256", text_hash.to_string()),
        ("ctx", opts.ctx.to_string()),
        ("chunks", n_chunks.to_string()),
        ("default_threshold", model.config.early_exit_threshold.unwrap_or(1.0).to_string()),
        ("tool_version", env!("CARGO_PKG_VERSION").to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let writer = Writer::new(path, specs, &meta)?;
    Ok(ReferenceWriter { writer, gates: vec![] })
}

fn open_reference_file(
    path: &Path,
    text_hash: &str,
    opts: &ValidateOptions,
    n_chunks: usize,
    per_chunk: usize,
    loops: usize,
    vocab: usize,
) -> anyhow::Result<Stored> {
    let file = SafetensorsFile::open(path)?;
    let m = &file.header().metadata;
    let get = |k: &str| m.get(k).cloned().unwrap_or_default();
    anyhow::ensure!(get("format") == REF_FORMAT, "{}: not a reference written by `validate --save-reference`", path.display());
    anyhow::ensure!(
        get("text_sha256") == text_hash,
        "{}: the stored reference was computed on another text (its tokens' hash differs); run the reference again",
        path.display()
    );
    anyhow::ensure!(
        get("ctx") == opts.ctx.to_string() && get("chunks") == n_chunks.to_string(),
        "{}: stored with --ctx {} over {} chunks, asked for --ctx {} over {n_chunks}",
        path.display(),
        get("ctx"),
        get("chunks"),
        opts.ctx
    );
    let lp = file.info("logprobs").ok_or_else(|| anyhow::anyhow!("{}: no `logprobs` tensor", path.display()))?;
    anyhow::ensure!(
        lp.shape == [n_chunks * per_chunk, loops, vocab] && lp.dtype == DType::F16,
        "{}: `logprobs` is {} {:?}, expected F16 [{}, {loops}, {vocab}] for this candidate",
        path.display(),
        lp.dtype,
        lp.shape,
        n_chunks * per_chunk
    );
    let g = file.info("gate_logits").ok_or_else(|| anyhow::anyhow!("{}: no `gate_logits` tensor", path.display()))?;
    anyhow::ensure!(g.shape == [n_chunks * per_chunk, loops] && g.dtype == DType::F32, "{}: `gate_logits` has the wrong shape", path.display());
    Ok(Stored { file, per_chunk, loops, vocab })
}

fn read_chunk(s: &Stored, ci: usize) -> ChunkSide {
    let (n, t, v) = (s.per_chunk, s.loops, s.vocab);
    let lp = s.file.bytes("logprobs").expect("checked");
    let g = s.file.bytes("gate_logits").expect("checked");
    let lb = &lp[ci * n * t * v * 2..(ci + 1) * n * t * v * 2];
    let gb = &g[ci * n * t * 4..(ci + 1) * n * t * 4];
    ChunkSide {
        logprobs: lb.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
        gates: gb.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    }
}

/// The refusal when a stored reference belongs to another model.
pub fn check_reference_model(path: &Path, expected_hash: &str) -> anyhow::Result<()> {
    let f = SafetensorsFile::open(path)?;
    let h = f.header().metadata.get("model_sha256").cloned().unwrap_or_default();
    anyhow::ensure!(
        h == expected_hash,
        "{}: the stored reference belongs to another model (sha256 {}...), not {}...",
        path.display(),
        &h[..h.len().min(12)],
        &expected_hash[..expected_hash.len().min(12)]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(p: &[f64]) -> Vec<f16> {
        p.iter().map(|x| f16::from_f64(x.ln())).collect()
    }

    #[test]
    fn loop_metrics_match_a_direct_computation() {
        // two tokens over a vocabulary of 3
        let r1 = [0.7, 0.2, 0.1];
        let c1 = [0.6, 0.3, 0.1];
        let r2 = [0.1, 0.3, 0.6];
        let c2 = [0.2, 0.5, 0.3];
        let mut acc = LoopAcc::default();
        acc.add(&lp(&r1), &lp(&c1), 0);
        acc.add(&lp(&r2), &lp(&c2), 2);
        let m = acc.finish(1);
        // values as the f16 rounding of the log-probs leaves them
        let q = |x: f64| f16::from_f64(x.ln()).to_f64();
        let kl = |r: &[f64], c: &[f64]| r.iter().zip(c).map(|(a, b)| q(*a).exp() * (q(*a) - q(*b))).sum::<f64>();
        let kls = [kl(&r1, &c1), kl(&r2, &c2)];
        assert!((m.kl_mean - (kls[0] + kls[1]) / 2.0).abs() < 1e-12);
        assert!((m.kl_max - kls[0].max(kls[1])).abs() < 1e-12);
        let ppl_r = ((-q(0.7) - q(0.6)) / 2.0).exp();
        let ppl_c = ((-q(0.6) - q(0.3)) / 2.0).exp();
        assert!((m.ppl_reference - ppl_r).abs() < 1e-9 && (m.ppl_candidate - ppl_c).abs() < 1e-9);
        assert!((m.ppl_ratio - ppl_c / ppl_r).abs() < 1e-9);
        // top tokens: 0 vs 0 (same), 2 vs 1 (different)
        assert_eq!(m.same_top_token_pct, 50.0);
        let dp = ((q(0.7).exp() - q(0.6).exp()).powi(2) + (q(0.6).exp() - q(0.3).exp()).powi(2)) / 2.0;
        assert!((m.top_token_prob_change_rms - dp.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn same_top_on_decided_tokens_leaves_out_the_references_near_ties() {
        let mut acc = LoopAcc::default();
        for (r, c) in [
            ([0.8, 0.1, 0.1], [0.7, 0.2, 0.1]),     // decided (8x), same top
            ([0.34, 0.33, 0.33], [0.33, 0.34, 0.33]), // a near tie, reordered
            ([0.45, 0.4, 0.15], [0.4, 0.45, 0.15]),  // 1.125x: a near tie, reordered
            ([0.1, 0.2, 0.7], [0.1, 0.2, 0.7]),      // decided (3.5x, runner-up before the top), same
            ([0.05, 0.65, 0.3], [0.05, 0.3, 0.65]),  // decided (2.17x), reordered: a real miss
        ] {
            acc.add(&lp(&r), &lp(&c), 0);
        }
        let m = acc.finish(1);
        assert!((m.same_top_token_pct - 40.0).abs() < 1e-9, "{}", m.same_top_token_pct);
        assert!((m.decided_tokens_pct - 60.0).abs() < 1e-9, "{}", m.decided_tokens_pct);
        assert!((m.same_top_decided_pct - 200.0 / 3.0).abs() < 1e-9, "{}", m.same_top_decided_pct);

        // a top tied with a later token is not decided; with none decided the share is 100%
        let mut acc = LoopAcc::default();
        acc.add(&lp(&[0.4, 0.2, 0.4]), &lp(&[0.2, 0.4, 0.4]), 0);
        let m = acc.finish(1);
        assert_eq!((m.same_top_token_pct, m.decided_tokens_pct, m.same_top_decided_pct), (0.0, 0.0, 100.0));
    }

    #[test]
    fn identical_sides_give_ratio_one_and_zero_kl() {
        let mut acc = LoopAcc::default();
        for p in [[0.4, 0.3, 0.3], [0.1, 0.1, 0.8]] {
            acc.add(&lp(&p), &lp(&p), 1);
        }
        let m = acc.finish(0);
        assert_eq!((m.ppl_ratio, m.kl_mean, m.kl_max, m.same_top_token_pct, m.same_top_decided_pct), (1.0, 0.0, 0.0, 100.0, 100.0));
        assert_eq!(m.decided_tokens_pct, 50.0);
    }
}
