//! Importance matrices (llama.cpp's "imatrix"): per weight, the mean squared input activation of
//! each input column over a calibration text, which the quantizers use to weight their error
//! (`quant::quantize_row` with an importance vector). [`collect`] computes one with the model,
//! loop-aware; [`file`] reads and writes llama.cpp's two layouts.

pub mod collect;
pub mod file;

pub use collect::{collect, Calibration, Weighting};
pub use file::{Format, Imatrix};


use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An importance matrix and the path it was read from (as given: recorded in the output).
#[derive(Debug, Clone)]
pub struct ImatrixInput {
    pub path: PathBuf,
    pub matrix: Imatrix,
    /// The entries kept from the quantizers ([`ImatrixInput::apply`]; already dropped from `matrix`).
    pub filter: EntryFilter,
}

impl ImatrixInput {
    pub fn read(path: &Path) -> Result<Self> {
        Ok(ImatrixInput { path: path.to_path_buf(), matrix: Imatrix::read(path)?, filter: EntryFilter::All })
    }

    /// The options that give this input: `--imatrix PATH` and its filter's flags.
    pub fn options(&self) -> String {
        let (flag, names) = match &self.filter {
            EntryFilter::All => ("", &[][..]),
            EntryFilter::Include(v) => ("--include-weights", &v[..]),
            EntryFilter::Exclude(v) => ("--exclude-weights", &v[..]),
        };
        let mut s = format!("--imatrix {}", self.path.display());
        for n in names {
            s += &format!(" {flag} {n}");
        }
        s
    }
}

/// Which entries of a matrix the quantizers use, as llama-quantize's `--include-weights` and
/// `--exclude-weights`: by strings contained in the entries' GGUF tensor names.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum EntryFilter {
    /// Every entry.
    #[default]
    All,
    /// Only the entries whose name contains one of these strings.
    Include(Vec<String>),
    /// Every entry but those whose name contains one of these strings.
    Exclude(Vec<String>),
}

impl ImatrixInput {
    /// Drops the entries that `filter` keeps from the quantizers: those tensors are then
    /// quantized as without a matrix (or refused, where their type needs importance data). An
    /// empty string, or one that no entry's name contains, is refused: a misspelt name would
    /// otherwise change nothing, silently.
    pub fn apply(&mut self, filter: &EntryFilter) -> Result<()> {
        let (names, flag, keep_named) = match filter {
            EntryFilter::All => return Ok(()),
            EntryFilter::Include(v) => (v, "--include-weights", true),
            EntryFilter::Exclude(v) => (v, "--exclude-weights", false),
        };
        for n in names {
            if n.is_empty() || !self.matrix.entries.keys().any(|k| k.contains(n.as_str())) {
                let some: Vec<&str> = self.matrix.entries.keys().take(3).map(|k| k.as_str()).collect();
                return Err(Error::Usage(format!(
                    "{flag} `{n}`: no entry of the importance matrix {} has a name containing it (its names are GGUF tensor names: {}, ...)",
                    self.path.display(),
                    some.join(", ")
                )));
            }
        }
        self.matrix.entries.retain(|k, _| names.iter().any(|n| k.contains(n.as_str())) == keep_named);
        self.filter = filter.clone();
        Ok(())
    }
}

/// The importance vector of a weight (by GGUF tensor name) with `cols` columns, checked as
/// llama-quantize checks it: an entry of another length is an error (this matrix was made for
/// another model), except for the token embedding, which llama-quantize quantizes without one.
/// `None`: the matrix has no entry (the weight is quantized without importance).
pub fn importance_for(im: &ImatrixInput, name: &str, cols: usize) -> Result<Option<Vec<f32>>> {
    match im.matrix.weights(name) {
        Some(w) if w.len() == cols => Ok(Some(w)),
        Some(_) if name == "token_embd.weight" => Ok(None),
        Some(w) => Err(Error::tensor(
            &im.path,
            name,
            format!("holds {} importance values, but the weight has {cols} columns: this importance matrix was made for another model", w.len()),
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use file::Entry;

    fn input(names: &[&str]) -> ImatrixInput {
        let entries = names.iter().map(|n| (n.to_string(), Entry { sums: vec![1.0; 4], count: 1.0 })).collect();
        let matrix = Imatrix { entries, datasets: vec![], chunk_count: 1, chunk_size: 8, format: Format::Gguf, weighting: None };
        ImatrixInput { path: "m.gguf".into(), matrix, filter: EntryFilter::All }
    }

    fn names(im: &ImatrixInput) -> Vec<&str> {
        im.matrix.entries.keys().map(|k| k.as_str()).collect()
    }

    const ALL: [&str; 4] = ["blk.0.attn_k.weight", "blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"];

    #[test]
    fn include_and_exclude_keep_the_entries_llama_quantize_keeps() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut im = input(&ALL);
        im.apply(&EntryFilter::Exclude(s(&["attn_k"]))).unwrap();
        assert_eq!(names(&im), ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]);
        assert_eq!(im.options(), "--imatrix m.gguf --exclude-weights attn_k");
        let mut im = input(&ALL);
        im.apply(&EntryFilter::Include(s(&["attn_k", "ffn_down"]))).unwrap();
        assert_eq!(names(&im), ["blk.0.attn_k.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"]);
        assert_eq!(im.options(), "--imatrix m.gguf --include-weights attn_k --include-weights ffn_down");
        let mut im = input(&ALL);
        im.apply(&EntryFilter::Exclude(s(&["blk.1."]))).unwrap();
        assert_eq!(names(&im), ["blk.0.attn_k.weight", "blk.0.attn_q.weight"]);
        let mut im = input(&ALL);
        im.apply(&EntryFilter::All).unwrap();
        assert_eq!(names(&im), ALL);
    }

    #[test]
    fn a_name_that_matches_no_entry_is_refused_naming_it() {
        for f in [EntryFilter::Exclude(vec!["attn_kk".into()]), EntryFilter::Include(vec!["attn_k".into(), "".into()])] {
            let mut im = input(&ALL);
            let e = im.apply(&f).unwrap_err().to_string();
            assert!(e.contains("m.gguf") && e.contains("no entry"), "{e}");
            assert_eq!(names(&im), ALL, "nothing dropped on an error");
        }
    }
}
