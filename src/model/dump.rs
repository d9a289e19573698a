//! `logits`: every loop's state, logits, gate and exit pdf for a token sequence, written with the
//! names, shapes and meanings of the golden `expected.safetensors`, so that any implementation can
//! be compared with ours.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{KvPolicy, LoopOutputs, OuroModel};
use crate::output::PendingOutput;
use crate::stfile::{DType, TensorSpec, Writer};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Runs `tokens` through all loops and writes the tensors to `out`.
pub fn write_logits(model: &OuroModel, tokens: &[u32], out: &Path, force: bool) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(!tokens.is_empty(), "no tokens given");
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= model.dims.vocab) {
        anyhow::bail!("token id {bad} is outside the model's vocabulary ({})", model.dims.vocab);
    }
    let fwd = model.forward_full(tokens, KvPolicy::Full)?;
    let lo = LoopOutputs::new(model, &fwd)?;
    let (t, n, h, v) = (fwd.hidden.len(), tokens.len(), model.dims.hidden, model.dims.vocab);
    let hidden: Vec<f32> = fwd
        .hidden
        .iter()
        .map(|x| Ok(x.flatten_all()?.to_vec1::<f32>()?))
        .collect::<anyhow::Result<Vec<_>>>()?
        .concat();
    let pdf_by_loop: Vec<f32> = (0..t).flat_map(|s| lo.pdf.iter().map(move |p| p[s])).collect();
    let ids: Vec<u8> = tokens.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
    let parts: Vec<(&str, DType, Vec<usize>, Vec<u8>)> = vec![
        ("tokens", DType::I64, vec![n], ids),
        ("step_hidden", DType::F32, vec![t, n, h], f32_bytes(&hidden)),
        ("step_logits", DType::F32, vec![t, n, v], f32_bytes(&lo.step_logits.concat())),
        ("gate_logits", DType::F32, vec![t, n], f32_bytes(&lo.gate_logits.concat())),
        ("exit_pdf", DType::F32, vec![t, n], f32_bytes(&pdf_by_loop)),
        ("logits_default", DType::F32, vec![n, v], f32_bytes(&lo.logits(model.default_mode()))),
    ];
    let pending = PendingOutput::file(out, force)?;
    let specs = parts
        .iter()
        .map(|(name, dtype, shape, _)| TensorSpec {
            name: name.to_string(),
            dtype: *dtype,
            shape: shape.clone(),
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("produced_by".to_string(), format!("ouro-quant {}", env!("CARGO_PKG_VERSION")));
    let mut w = Writer::new(pending.path(), specs, &meta)?;
    for (_, _, _, bytes) in &parts {
        w.write(bytes)?;
    }
    w.finish()?;
    crate::stfile::SafetensorsFile::open(pending.path())?;
    Ok(pending.commit()?)
}

/// Parses token ids separated by commas or whitespace.
pub fn parse_token_list(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("`{s}` is not a token id (expected non-negative integers)"))
        })
        .collect()
}
