//! The model card written beside a GGUF file (`X.gguf` -> `X.md`, the README.md of a GGUF repo on
//! upload) when `convert --validate` runs: what the file is, read back from its own metadata, how
//! to run it, and the validation summary.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::gguf::file::GgufFile;

/// Where the card of `gguf` goes: the same name with `.md`.
pub fn card_path(gguf: &Path) -> PathBuf {
    gguf.with_extension("md")
}

/// The card of the GGUF file at `path`, with `validation` (Markdown) as its Validation section.
pub fn model_card(path: &Path, validation: &str) -> Result<String> {
    let f = GgufFile::open(path)?;
    let h = &f.header;
    let s = |k: &str| h.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let base = s("general.name");
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let gate = h.get("ouro.exit_gate.weight").and_then(|v| v.as_array()).map_or(0, |a| a.len() + 1);
    let params: usize = h.tensors.iter().map(|t| t.numel()).sum::<usize>() + gate;
    let bytes = f.file_len() as u64;
    let mut types: Vec<(String, usize)> = vec![];
    for t in &h.tensors {
        let n = t.ggml_type.name().to_string();
        match types.iter_mut().find(|(k, _)| *k == n) {
            Some(e) => e.1 += 1,
            None => types.push((n, 1)),
        }
    }
    let types = types.iter().map(|(t, n)| format!("{n} {t}")).collect::<Vec<_>>().join(", ");
    let loops = h.get("ouro.num_loops").and_then(|v| v.as_u32()).unwrap_or(0);
    Ok(format!(
        "---\nbase_model: {base}\nlicense: apache-2.0\npipeline_tag: text-generation\nquantized_by: ouro-quant\ntags:\n- gguf\n- ouro\n- looped-language-model\n---\n\n\
# {stem}\n\n\
GGUF conversion of [{base}](https://huggingface.co/{base}) made with ouro-quant version **{ver}** (`{opts}`):\n\
`{file}`, {size}, {bpw:.2} bits per weight, {nt} tensors ({types}).\n\
Source weights: sha256 `{sha}`. The exit gate is stored as metadata (`ouro.exit_gate.weight`, `ouro.exit_gate.bias`),\n\
so the {loops} loops and the per-token exit decision survive the conversion.\n\n\
## Use\n\n\
```bash\n\
ouro-quant run {file} --chat \"hello\"                       # all {loops} loops\n\
ouro-quant run {file} --chat \"hello\" --exit-threshold 0.5  # stop each token's loops at exit CDF >= 0.5\n\
ouro-quant inspect --verify {file}                        # every tensor against its recorded checksum\n\
```\n\n\
llama.cpp releases have no `ouro` architecture; a build with the community `ouro` port loads this file\n\
(`llama-cli -m {file} -cnv`), running all loops.\n\n\
## Validation\n\n{validation}\n",
        ver = s("ouro_quant.version"),
        opts = s("ouro_quant.options"),
        size = crate::inspect::human_bytes(bytes),
        bpw = bytes as f64 * 8.0 / params.max(1) as f64,
        nt = h.tensors.len(),
        sha = s("ouro_quant.source.sha256"),
    ))
}
