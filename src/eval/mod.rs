//! Evaluation over a text, the way llama.cpp's perplexity tool does it: the text is tokenized once,
//! cut into chunks of `ctx` tokens, each chunk runs in one pass, and only the second half of each
//! chunk is scored (so every scored token has at least `ctx/2` tokens of context). For every scored
//! token we keep what an Ouro evaluation needs: each loop's log-probability of the true next token
//! and the exit distribution over loops.

pub mod tasks;
pub mod validate;
pub mod verdict;

use serde::Serialize;

use crate::model::exit::threshold_exit;
use crate::model::{KvPolicy, OuroModel};

/// Per-token results of a model over a text.
#[derive(Debug, Clone)]
pub struct TextEval {
    /// Loops of the model.
    pub loops: usize,
    /// Index in the token sequence of every scored (predicted) token.
    pub positions: Vec<usize>,
    /// `[T][n]`: negative log-probability of the scored token under each loop's logits.
    pub nll: Vec<Vec<f32>>,
    /// `[n][T]`: the exit pdf at the position that predicts the token.
    pub pdf: Vec<Vec<f32>>,
}

/// The chunks of `n` tokens: `(start, len)`, `len = ctx` each (a last partial chunk is dropped, as
/// llama.cpp does), at most `max_chunks`.
pub fn chunks(n: usize, ctx: usize, max_chunks: Option<usize>) -> Vec<(usize, usize)> {
    let k = (n / ctx).min(max_chunks.unwrap_or(usize::MAX));
    (0..k).map(|c| (c * ctx, ctx)).collect()
}

/// [`chunks`] for scoring: refuses a context under 4 tokens and a text shorter than one chunk.
pub fn scored_chunks(n: usize, ctx: usize, max_chunks: Option<usize>) -> anyhow::Result<Vec<(usize, usize)>> {
    anyhow::ensure!(ctx >= 4, "--ctx {ctx}: at least 4 tokens");
    anyhow::ensure!(max_chunks != Some(0), "--chunks 0: at least one chunk must be scored");
    let spans = chunks(n, ctx, max_chunks);
    anyhow::ensure!(!spans.is_empty(), "the text has {n} tokens, fewer than one chunk of --ctx {ctx}");
    Ok(spans)
}

/// `log softmax(logits)[target]` computed stably in f64.
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    logits[target] as f64 - m - s.ln()
}

/// Runs `model` over `tokens` chunk by chunk and scores the second half of every chunk.
/// `each_chunk(start, &outputs)` sees every chunk's full per-loop outputs (for comparisons that
/// need whole distributions, such as KL divergence).
pub fn evaluate(
    model: &OuroModel,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    each_chunk: &mut dyn FnMut(usize, &crate::model::LoopOutputs),
) -> anyhow::Result<TextEval> {
    let spans = scored_chunks(tokens.len(), ctx, max_chunks)?;
    let t_max = model.dims.loops;
    let mut out = TextEval {
        loops: t_max,
        positions: vec![],
        nll: vec![vec![]; t_max],
        pdf: vec![],
    };
    for (start, len) in spans {
        let chunk = &tokens[start..start + len];
        let fwd = model.forward_full(chunk, KvPolicy::Full)?;
        let lo = crate::model::LoopOutputs::new(model, &fwd)?;
        let v = lo.vocab;
        for j in len / 2..len - 1 {
            let target = chunk[j + 1] as usize;
            for t in 0..t_max {
                out.nll[t].push(-log_prob(&lo.step_logits[t][j * v..(j + 1) * v], target) as f32);
            }
            out.pdf.push(lo.pdf[j].clone());
            out.positions.push(start + j + 1);
        }
        each_chunk(start, &lo);
    }
    Ok(out)
}

/// Perplexity and its standard error (delta method, as llama.cpp reports it) of per-token NLLs.
pub fn perplexity(nll: &[f32]) -> (f64, f64) {
    let n = nll.len() as f64;
    if n == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = nll.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = nll.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let ppl = mean.exp();
    (ppl, ppl * (var / n).sqrt())
}

impl TextEval {
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// NLL of token `i` when it exits at the first loop whose CDF reaches `q`.
    pub fn nll_at_threshold(&self, i: usize, q: f32) -> f32 {
        self.nll[threshold_exit(&self.pdf[i], q)][i]
    }

    /// Per-token NLLs under the CDF rule with threshold `q` (the upstream default mode with q = the
    /// config's `early_exit_threshold`).
    pub fn nll_threshold(&self, q: f32, select: Option<&[bool]>) -> Vec<f32> {
        (0..self.len()).filter(|&i| select.is_none_or(|s| s[i])).map(|i| self.nll_at_threshold(i, q)).collect()
    }

    /// Per-token NLLs of loop `t` (0-based), optionally only the selected tokens.
    pub fn nll_loop(&self, t: usize, select: Option<&[bool]>) -> Vec<f32> {
        (0..self.len()).filter(|&i| select.is_none_or(|s| s[i])).map(|i| self.nll[t][i]).collect()
    }

    /// How many of the (selected) tokens exit at each loop under threshold `q`.
    pub fn exit_histogram(&self, q: f32, select: Option<&[bool]>) -> Vec<usize> {
        let mut h = vec![0; self.loops];
        for i in (0..self.len()).filter(|&i| select.is_none_or(|s| s[i])) {
            h[threshold_exit(&self.pdf[i], q)] += 1;
        }
        h
    }

    /// Mean exit loop (1-based) of the (selected) tokens under threshold `q`.
    pub fn mean_exit_loop(&self, q: f32, select: Option<&[bool]>) -> f64 {
        let h = self.exit_histogram(q, select);
        let n: usize = h.iter().sum();
        h.iter().enumerate().map(|(t, &c)| (t + 1) as f64 * c as f64).sum::<f64>() / n as f64
    }
}

/// Unigram perplexity of the scored tokens under the token frequencies of the whole text: the
/// baseline a model that learned nothing about context would reach at best.
pub fn unigram_perplexity(tokens: &[u32], positions: &[usize]) -> f64 {
    let mut count = std::collections::HashMap::new();
    for &t in tokens {
        *count.entry(t).or_insert(0usize) += 1;
    }
    let n = tokens.len() as f64;
    let nll: f64 = positions.iter().map(|&p| -((count[&tokens[p]] as f64) / n).ln()).sum();
    (nll / positions.len() as f64).exp()
}

/// A compact summary of a [`TextEval`], per loop and in the default mode.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub tokens: usize,
    pub ppl_default: f64,
    pub ppl_per_loop: Vec<f64>,
    pub exit_histogram_q05: Vec<usize>,
}

impl TextEval {
    pub fn summary(&self, default_q: f32) -> Summary {
        Summary {
            tokens: self.len(),
            ppl_default: perplexity(&self.nll_threshold(default_q, None)).0,
            ppl_per_loop: (0..self.loops).map(|t| perplexity(&self.nll_loop(t, None)).0).collect(),
            exit_histogram_q05: self.exit_histogram(0.5, None),
        }
    }
}

/// Per-loop quality and exit behaviour of one kind of token.
#[derive(Debug, Clone, Serialize)]
pub struct KindReport {
    pub tokens: usize,
    pub ppl_per_loop: Vec<f64>,
    /// Mean exit loop (1-based) at q = 0.5.
    pub mean_exit_loop_q05: f64,
}

/// What the trained fixture must show (its README records it; `tests/trained_fixture.rs` asserts it),
/// computed on a text of the project's corpus (see [`crate::corpus`]).
#[derive(Debug, Clone, Serialize)]
pub struct CorpusReport {
    pub ctx: usize,
    pub scored_tokens: usize,
    pub unigram_ppl: f64,
    /// The config's default mode (CDF rule with `early_exit_threshold`).
    pub ppl_default: f64,
    pub ppl_per_loop: Vec<f64>,
    /// Fraction of scored tokens exiting at each loop at q = 0.5.
    pub exit_fractions_q05: Vec<f64>,
    /// Answer tokens of recall lines.
    pub recall_answers: KindReport,
    /// Answer tokens of manipulation lines.
    pub manipulation_answers: KindReport,
    /// Answer tokens of walks (`corpus::chain_line`), by the moves they need (empty
    /// when the text has none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain_answers: Vec<StepsReport>,
    /// Answer tokens of walks of two or more moves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_step_answers: Option<KindReport>,
    /// The CDF threshold (of 0.05, 0.10, ..., 0.95, 0.99) that runs the fewest loops while the
    /// perplexity stays within 1% of all loops' (the last loop's), and what it costs.
    pub adaptive_exit: AdaptiveExit,
}

/// [`KindReport`] of the answers that need a given number of steps.
#[derive(Debug, Clone, Serialize)]
pub struct StepsReport {
    pub steps: usize,
    #[serde(flatten)]
    pub report: KindReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdaptiveExit {
    pub q: f32,
    pub ppl: f64,
    /// Perplexity of the last loop, the reference.
    pub ppl_all_loops: f64,
    /// Mean loops run per token (1 to T), and as a share of T.
    pub mean_loops: f64,
    pub share_of_loops: f64,
}

impl TextEval {
    /// The threshold of a grid that runs the fewest loops at most `tolerance` (relative) above the
    /// last loop's perplexity; the last loop itself (q = 1) when none does.
    pub fn adaptive_exit(&self, tolerance: f64) -> AdaptiveExit {
        let all = perplexity(&self.nll_loop(self.loops - 1, None)).0;
        let grid = (1..=19).map(|i| i as f32 * 0.05).chain([0.99, 1.0]);
        let mut best = AdaptiveExit { q: 1.0, ppl: all, ppl_all_loops: all, mean_loops: self.loops as f64, share_of_loops: 1.0 };
        for q in grid {
            let ppl = perplexity(&self.nll_threshold(q, None)).0;
            let loops = self.mean_exit_loop(q, None);
            if ppl <= all * (1.0 + tolerance) && loops < best.mean_loops {
                best = AdaptiveExit { q, ppl, ppl_all_loops: all, mean_loops: loops, share_of_loops: loops / self.loops as f64 };
            }
        }
        best
    }
}

/// Evaluates `model` on `text` (lines of the project's corpus) with chunks of `ctx` tokens.
pub fn corpus_report(model: &OuroModel, tok: &tokenizers::Tokenizer, text: &str, ctx: usize) -> anyhow::Result<CorpusReport> {
    use crate::corpus::{token_chain_steps, token_kinds, Kind};
    let enc = tok.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let ids = enc.get_ids().to_vec();
    let kinds = token_kinds(text, enc.get_offsets());
    let steps = token_chain_steps(text, enc.get_offsets());
    let ev = evaluate(model, &ids, ctx, None, &mut |_, _| {})?;
    let select = |k: Kind| -> Vec<bool> { ev.positions.iter().map(|&p| kinds[p] == (k, true)).collect() };
    let report_of = |s: Vec<bool>| KindReport {
        tokens: s.iter().filter(|&&b| b).count(),
        ppl_per_loop: (0..ev.loops).map(|t| perplexity(&ev.nll_loop(t, Some(&s))).0).collect(),
        mean_exit_loop_q05: ev.mean_exit_loop(0.5, Some(&s)),
    };
    let chain_answer = |p: usize| if kinds[p].1 { steps[p] } else { None };
    let levels: std::collections::BTreeSet<usize> = ev.positions.iter().filter_map(|&p| chain_answer(p)).collect();
    let chain_answers = levels
        .iter()
        .map(|&n| StepsReport { steps: n, report: report_of(ev.positions.iter().map(|&p| chain_answer(p) == Some(n)).collect()) })
        .collect();
    let multi: Vec<bool> = ev.positions.iter().map(|&p| chain_answer(p).is_some_and(|n| n >= 2)).collect();
    let multi_step_answers = multi.iter().any(|&b| b).then(|| report_of(multi));
    let kind_report = |k: Kind| {
        let s = select(k);
        KindReport {
            tokens: s.iter().filter(|&&b| b).count(),
            ppl_per_loop: (0..ev.loops).map(|t| perplexity(&ev.nll_loop(t, Some(&s))).0).collect(),
            mean_exit_loop_q05: ev.mean_exit_loop(0.5, Some(&s)),
        }
    };
    let q = model.config.early_exit_threshold.unwrap_or(1.0) as f32;
    let hist = ev.exit_histogram(0.5, None);
    Ok(CorpusReport {
        ctx,
        scored_tokens: ev.len(),
        unigram_ppl: unigram_perplexity(&ids, &ev.positions),
        ppl_default: perplexity(&ev.nll_threshold(q, None)).0,
        ppl_per_loop: (0..ev.loops).map(|t| perplexity(&ev.nll_loop(t, None)).0).collect(),
        exit_fractions_q05: hist.iter().map(|&c| c as f64 / ev.len() as f64).collect(),
        recall_answers: kind_report(Kind::Recall),
        manipulation_answers: kind_report(Kind::Manipulation),
        chain_answers,
        multi_step_answers,
        adaptive_exit: ev.adaptive_exit(0.01),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_and_scoring_follow_llama_perplexity() {
        assert_eq!(chunks(10, 4, None), vec![(0, 4), (4, 4)]);
        assert_eq!(chunks(10, 4, Some(1)), vec![(0, 4)]);
        assert!(chunks(3, 4, None).is_empty());
    }

    /// Two loops, two tokens: one sure at loop 1 and as good there as at loop 2, one that needs
    /// loop 2 (loop 1's NLL 3 against 1) and whose gate gives loop 1 only 0.27.
    #[test]
    fn adaptive_exit_by_hand() {
        let ev = TextEval { loops: 2, positions: vec![1, 2], nll: vec![vec![1.0, 3.0], vec![1.0, 1.0]], pdf: vec![vec![0.8, 0.2], vec![0.27, 0.73]] };
        let a = ev.adaptive_exit(0.01);
        // q <= 0.27 sends both out at loop 1 (ppl e^2: refused); 0.3 keeps the second to loop 2
        assert_eq!((a.q, a.mean_loops, a.share_of_loops), (0.3f32 * 1.0, 1.5, 0.75), "{a:?}");
        assert!((a.ppl - 1f64.exp()).abs() < 1e-6 && (a.ppl_all_loops - 1f64.exp()).abs() < 1e-6, "{a:?}");
        // a model whose first loop is worse for every token: no saving within 1%
        let ev = TextEval { nll: vec![vec![2.0, 3.0], vec![1.0, 1.0]], ..ev };
        assert_eq!(ev.adaptive_exit(0.01).mean_loops, 2.0);
    }

    #[test]
    fn log_prob_and_perplexity_by_hand() {
        // uniform over 4: log 1/4
        assert!((log_prob(&[0.0; 4], 2) - (0.25f64).ln()).abs() < 1e-12);
        // logits [ln 1, ln 3]: p = 1/4, 3/4
        let l = [0.0f32, 3f32.ln()];
        assert!((log_prob(&l, 1) - 0.75f64.ln()).abs() < 1e-6);
        // perplexity of constant NLL ln 5 is 5 with zero error
        let (p, e) = perplexity(&[5f32.ln(); 10]);
        assert!((p - 5.0).abs() < 1e-5 && e.abs() < 1e-6);
        // unigram: tokens a a b, scored [b] -> p(b) = 1/3
        assert!((unigram_perplexity(&[7, 7, 9], &[2]) - 3.0).abs() < 1e-12);
    }

    /// `speedup_over` compares the two runs chunk by chunk: a chunk where both were slow (the
    /// machine busy) does not count against either, as a ratio of overall rates would.
    #[test]
    fn speedup_is_the_median_chunk_ratio() {
        let run = |secs: Vec<f64>| DecodeEval {
            exit_threshold: None,
            kv: KvPolicy::Full,
            kv_fill: crate::model::SkipFill::Copy,
            kv_dtype: "f32".into(),
            scored_tokens: 0,
            ppl: 1.0,
            ppl_se: 0.0,
            mean_loops_per_token: 4.0,
            mean_caught_up_loops_per_token: 0.0,
            loops_histogram: vec![],
            decode_tokens_per_s: 0.0,
            step_seconds: secs,
        };
        let base = run(vec![1.0, 1.0, 10.0, 1.0, 1.2]);
        let fast = run(vec![0.5, 0.5, 8.0, 0.4, 0.6]);
        assert_eq!(fast.speedup_over(&base), 2.0);
        assert_eq!(base.speedup_over(&base), 1.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}

/// Perplexity measured the way a decoder runs: each chunk's first half is prefilled in one pass,
/// then every further token is fed alone through the KV cache (teacher forcing), and the next token
/// is scored with the logits of the loop the token stopped at. With `LoopControl::AdaptiveExit(q)`
/// this measures what early exit does to a generation, including its KV policy (the skipped
/// (loop, layer) slots filled from the last computed loop), which a full-sequence pass cannot.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeEval {
    /// `None`: every loop (the last one read out).
    pub exit_threshold: Option<f32>,
    pub kv: KvPolicy,
    pub kv_fill: crate::model::SkipFill,
    /// `"F32"` or `"F16"`.
    pub kv_dtype: String,
    pub scored_tokens: usize,
    pub ppl: f64,
    pub ppl_se: f64,
    pub mean_loops_per_token: f64,
    /// Under `--kv-fill compute`: loops run for earlier decoded tokens because a later one needed
    /// them, per scored token (0 under the other fills). The loops computed per token are this
    /// plus `mean_loops_per_token`.
    pub mean_caught_up_loops_per_token: f64,
    /// Tokens exiting after each loop (index 0 = loop 1).
    pub loops_histogram: Vec<usize>,
    /// Decode steps per second (the prefill of each chunk's first half excluded): the median over
    /// chunks of each chunk's rate, so that the first chunk's warm-up and a moment's interference
    /// from other processes do not move it.
    pub decode_tokens_per_s: f64,
    /// Mean seconds per decode step, per chunk.
    #[serde(skip)]
    pub step_seconds: Vec<f64>,
}

/// Runs [`DecodeEval`] over `tokens` in chunks of `ctx` (the second half of each scored, as in
/// [`evaluate`]).
#[allow(clippy::too_many_arguments)]
pub fn decode_eval(
    model: &OuroModel,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    exit_threshold: Option<f32>,
    kv: KvPolicy,
    kv_fill: crate::model::SkipFill,
    kv_dtype: candle_core::DType,
) -> anyhow::Result<DecodeEval> {
    let mut runs = decode_evals(model, tokens, ctx, max_chunks, &[exit_threshold], kv, kv_fill, kv_dtype)?;
    Ok(runs.remove(0))
}

/// [`decode_eval`] for several exit thresholds, taken in turn on each chunk (all of them on
/// chunk 1, then on chunk 2, ...), so that their speeds are measured moments apart on the same
/// tokens and [`DecodeEval::speedup_over`] compares them chunk by chunk.
#[allow(clippy::too_many_arguments)]
pub fn decode_evals(
    model: &OuroModel,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    exit_thresholds: &[Option<f32>],
    kv: KvPolicy,
    kv_fill: crate::model::SkipFill,
    kv_dtype: candle_core::DType,
) -> anyhow::Result<Vec<DecodeEval>> {
    use crate::model::{KvCache, LoopControl};
    let spans = scored_chunks(tokens.len(), ctx, max_chunks)?;
    struct Acc {
        nll: Vec<f32>,
        hist: Vec<usize>,
        caught_up: usize,
        seconds: Vec<f64>,
    }
    let mut accs: Vec<Acc> = exit_thresholds
        .iter()
        .map(|_| Acc {
            nll: vec![],
            hist: vec![0; model.dims.loops],
            caught_up: 0,
            seconds: vec![],
        })
        .collect();
    for (start, len) in spans {
        let chunk = &tokens[start..start + len];
        for (acc, q) in accs.iter_mut().zip(exit_thresholds) {
            let control = q.map_or(LoopControl::All, LoopControl::AdaptiveExit);
            let mut cache = KvCache::new(&model.dims, kv).with_skip_fill(kv_fill).with_dtype(kv_dtype).with_capacity(len);
            let half = len / 2;
            model.forward(&chunk[..half], &mut cache, LoopControl::All)?;
            let t0 = std::time::Instant::now();
            for j in half..len - 1 {
                let out = model.forward(&chunk[j..j + 1], &mut cache, control)?;
                let loops = out.loops_run();
                let logits = model.logits(out.hidden.last().expect("a loop ran"))?.flatten_all()?.to_vec1::<f32>()?;
                acc.nll.push(-log_prob(&logits, chunk[j + 1] as usize) as f32);
                acc.hist[loops - 1] += 1;
            }
            acc.seconds.push(t0.elapsed().as_secs_f64().max(1e-9) / (len - 1 - half) as f64);
            acc.caught_up += cache.caught_up_loops();
        }
    }
    Ok(accs
        .into_iter()
        .zip(exit_thresholds)
        .map(|(acc, &exit_threshold)| {
            let (ppl, ppl_se) = perplexity(&acc.nll);
            let n = acc.nll.len();
            let loops: usize = acc.hist.iter().enumerate().map(|(i, c)| (i + 1) * c).sum();
            let rates: Vec<f64> = acc.seconds.iter().map(|s| 1.0 / s).collect();
            DecodeEval {
                exit_threshold,
                kv,
                kv_fill,
                kv_dtype: format!("{kv_dtype:?}").to_lowercase(),
                scored_tokens: n,
                ppl,
                ppl_se,
                mean_loops_per_token: loops as f64 / n.max(1) as f64,
                mean_caught_up_loops_per_token: acc.caught_up as f64 / n.max(1) as f64,
                loops_histogram: acc.hist,
                decode_tokens_per_s: median(rates),
                step_seconds: acc.seconds,
            }
        })
        .collect())
}

/// The median (0 for none).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        k if k % 2 == 1 => v[k / 2],
        k => (v[k / 2 - 1] + v[k / 2]) / 2.0,
    }
}

impl DecodeEval {
    /// How many times faster this run decoded than `base` (run by the same [`decode_evals`]
    /// call): the median over chunks of the ratio of their mean step times on that chunk.
    pub fn speedup_over(&self, base: &DecodeEval) -> f64 {
        median(base.step_seconds.iter().zip(&self.step_seconds).map(|(b, s)| b / s).collect())
    }}
