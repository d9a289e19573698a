//! Collecting an importance matrix: the model runs over a calibration text chunk by chunk (each
//! chunk in one pass, all loops, no cache shared between chunks), and every projection's input rows
//! are squared and summed per input column, as llama-imatrix's callback does for each matmul it
//! sees: a looped model applies each weight once per loop, so each loop's product is one more
//! matmul with that weight (`counts` = loops x tokens under `loops` weighting).
//!
//! `exit:q` weighting keeps loop `t`'s rows only for the tokens that adaptive exit with threshold
//! `q` would still be running at `t`: those whose exit CDF over the loops before `t` is below `q`
//! (the runner's own stopping rule, [`crate::model::exit::may_stop`]). Loop 0 always counts.
//!
//! Sums are kept in f64, column by column in token order, so the result does not depend on the
//! thread count; they are stored as f32, as llama.cpp stores them.

use std::collections::BTreeMap;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::model::exit::may_stop;
use crate::model::{CResult, KvCache, KvPolicy, LoopControl, Observer, OuroModel, Site};

use super::file::{Entry, Format, Imatrix};

/// Which loops' products are counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weighting {
    /// Every loop of every token, as llama-imatrix counts them.
    Loops,
    /// Loop `t` of a token only while adaptive exit at threshold `q` would still run it.
    Exit(f32),
}

impl Weighting {
    /// `loops`, `exit` (q = 0.5) or `exit:q` with q in (0, 1].
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected `loops`, `exit` or `exit:q` with q in (0, 1] (e.g. exit:0.5)");
        match s {
            "loops" => Ok(Weighting::Loops),
            "exit" => Ok(Weighting::Exit(0.5)),
            _ => {
                let q: f32 = s.strip_prefix("exit:").ok_or_else(bad)?.parse().map_err(|_| bad())?;
                if q > 0.0 && q <= 1.0 {
                    Ok(Weighting::Exit(q))
                } else {
                    Err(bad())
                }
            }
        }
    }

    /// The name written into the file (`loops`, `exit:0.5`).
    pub fn name(self) -> String {
        match self {
            Weighting::Loops => "loops".into(),
            Weighting::Exit(q) => format!("exit:{q}"),
        }
    }
}

/// Sums of one input site of one layer.
struct Acc {
    sums: Vec<f64>,
    rows: u64,
}

/// The [`Observer`] that sums squared inputs.
struct Collector {
    weighting: Weighting,
    loops: usize,
    acc: BTreeMap<(usize, Site), Acc>,
    /// Gate logits of the loops run so far, per token of the current chunk.
    gates: Vec<Vec<f32>>,
    /// Which tokens the current loop counts.
    keep: Vec<bool>,
    /// First non-finite input seen: (layer, site).
    bad: Option<(usize, Site)>,
}

impl Observer for Collector {
    fn input(&mut self, t: usize, layer: usize, site: Site, x: &Tensor) -> CResult<()> {
        let (n, cols) = x.dims2()?;
        if self.keep.len() != n {
            // a new chunk: its first loop counts every token
            self.keep = vec![true; n];
            self.gates = vec![vec![]; n];
        }
        let _ = t;
        let x = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let acc = self.acc.entry((layer, site)).or_insert_with(|| Acc { sums: vec![0.0; cols], rows: 0 });
        if acc.sums.len() != cols {
            candle_core::bail!("internal: layer {layer} {site:?} input has {cols} columns, earlier {}", acc.sums.len());
        }
        let keep = &self.keep;
        const COLS: usize = 64;
        acc.sums.par_chunks_mut(COLS).enumerate().for_each(|(b, s)| {
            for (r, k) in keep.iter().enumerate() {
                if !k {
                    continue;
                }
                let row = &x[r * cols + b * COLS..r * cols + b * COLS + s.len()];
                for (a, &v) in s.iter_mut().zip(row) {
                    *a += (v as f64) * (v as f64);
                }
            }
        });
        acc.rows += keep.iter().filter(|&&k| k).count() as u64;
        if self.bad.is_none() && !acc.sums.iter().all(|v| v.is_finite()) {
            self.bad = Some((layer, site));
        }
        Ok(())
    }

    fn loop_done(&mut self, t: usize, gate_logits: &Tensor) -> CResult<()> {
        let g = gate_logits.to_vec1::<f32>()?;
        for (seen, &x) in self.gates.iter_mut().zip(&g) {
            seen.push(x);
        }
        if let Weighting::Exit(q) = self.weighting {
            if t + 1 < self.loops {
                for (k, seen) in self.keep.iter_mut().zip(&self.gates) {
                    *k = *k && !may_stop(seen, self.loops, q);
                }
            }
        }
        if t + 1 == self.loops {
            // the chunk is done: the next input starts a new one
            self.keep.clear();
        }
        Ok(())
    }
}

/// What to collect over.
pub struct Calibration<'a> {
    pub tokens: &'a [u32],
    /// Tokens per chunk.
    pub ctx: usize,
    /// At most this many chunks.
    pub chunks: Option<usize>,
    pub weighting: Weighting,
    /// The calibration text's name as recorded in `imatrix.datasets`.
    pub dataset: String,
}

/// Runs `model` over the calibration chunks and returns the importance matrix, one entry per
/// 2-D weight of the decoder layers under its GGUF name. `progress(chunks done, chunks)`.
pub fn collect(model: &OuroModel, cal: &Calibration<'_>, progress: &mut dyn FnMut(usize, usize)) -> anyhow::Result<Imatrix> {
    anyhow::ensure!(cal.ctx >= 16, "--ctx {}: at least 16 tokens (llama-imatrix ignores products of fewer rows)", cal.ctx);
    anyhow::ensure!(cal.chunks != Some(0), "--chunks 0: at least one chunk");
    let spans = crate::eval::chunks(cal.tokens.len(), cal.ctx, cal.chunks);
    anyhow::ensure!(!spans.is_empty(), "the calibration text has {} tokens, fewer than one chunk of --ctx {}", cal.tokens.len(), cal.ctx);
    let loops = model.dims.loops;
    let mut c = Collector { weighting: cal.weighting, loops, acc: BTreeMap::new(), gates: vec![], keep: vec![], bad: None };
    for (k, &(start, len)) in spans.iter().enumerate() {
        let mut cache = KvCache::new(&model.dims, KvPolicy::Full);
        c.keep.clear();
        model.forward_observed(&cal.tokens[start..start + len], &mut cache, LoopControl::All, Some(&mut c))?;
        if let Some((layer, site)) = c.bad {
            anyhow::bail!(
                "chunk {} (tokens {start}..{}): the inputs of layer {layer}'s {} overflowed to a non-finite sum: the model's activations are out of range",
                k + 1,
                start + len,
                site.weights()[0]
            );
        }
        progress(k + 1, spans.len());
    }
    let cfg = &model.config;
    let mut entries = BTreeMap::new();
    for ((layer, site), acc) in &c.acc {
        let sums: Vec<f32> = acc.sums.iter().map(|&v| v as f32).collect();
        for w in site.weights() {
            let hf = format!("model.layers.{layer}.{w}");
            let name = crate::gguf::arch::gguf_name(cfg, &hf).ok_or_else(|| anyhow::anyhow!("internal: no GGUF name for {hf}"))?;
            entries.insert(name, Entry { sums: sums.clone(), count: acc.rows as f64 });
        }
    }
    let max_rows = c.acc.values().map(|a| a.rows).max().unwrap_or(0);
    Ok(Imatrix {
        entries,
        datasets: vec![cal.dataset.clone()],
        // what llama-imatrix records: rows seen by the most-used weight over the chunk size (for
        // a looped model, `loops` times the chunks under `loops` weighting)
        chunk_count: (max_rows / cal.ctx as u64) as u32,
        chunk_size: cal.ctx as u32,
        format: Format::Gguf,
        weighting: Some(cal.weighting.name()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighting_parses_what_it_documents() {
        assert_eq!(Weighting::parse("loops"), Ok(Weighting::Loops));
        assert_eq!(Weighting::parse("exit"), Ok(Weighting::Exit(0.5)));
        assert_eq!(Weighting::parse("exit:0.9"), Ok(Weighting::Exit(0.9)));
        for bad in ["exit:0", "exit:1.5", "exit:x", "loop", ""] {
            assert!(Weighting::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Weighting::Exit(0.5).name(), "exit:0.5");
    }
}
