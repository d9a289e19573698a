//! The CI part of the fuzzing (the long runs are cargo-fuzz's, see `fuzz/README.md`): the committed
//! seeds and every input a fuzzer once found (`fuzz/regressions/`) replayed through the four
//! fuzz properties (`ouro_quant::fuzzing`), then a few thousand random mutations of the seeds per
//! property, and structured inputs for the safetensors header and the config.

use std::path::PathBuf;

use proptest::prelude::*;

use ouro_quant::checkpoint::OuroConfig;
use ouro_quant::fuzzing;

type Target = fn(&[u8]);
const TARGETS: [(&str, Target); 4] = [
    ("safetensors_header", fuzzing::safetensors_header),
    ("gguf_header", fuzzing::gguf_header),
    ("config", fuzzing::config),
    ("shard_index", fuzzing::shard_index),
];

/// Every file of `fuzz/<kind>/<target>/` except dot-files (`.gitkeep` keeps an empty folder in
/// git). A missing folder is an error, not an empty list: a renamed or deleted corpus must turn the
/// test red instead of silently replaying nothing.
fn inputs(kind: &str, target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind).join(target);
    let rd = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e} (every fuzz target needs its {kind} folder)", dir.display()));
    let mut v: Vec<_> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .map(|p| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    v.sort();
    v
}

/// The proptest seed: `PROPTEST_RNG_SEED` when set (to replay a run), else the first 64 bits of the
/// commit under test, so a run is reproducible per commit and new commits still explore new inputs;
/// a CI run cannot turn red on a finding that has nothing to do with the change it tests. Printed so
/// a failure names the seed that reproduces it.
fn commit_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let (seed, from) = if let Some(s) = std::env::var("PROPTEST_RNG_SEED").ok().and_then(|s| s.parse().ok()) {
            (s, "PROPTEST_RNG_SEED".to_string())
        } else {
            let head = std::process::Command::new("git")
                .args(["rev-parse", "HEAD"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string());
            match head.as_deref().and_then(|h| u64::from_str_radix(h.get(..16)?, 16).ok()) {
                Some(s) => (s, format!("commit {}", head.unwrap())),
                // outside a git checkout (a source tarball): one fixed seed, said aloud
                None => (0x6f75_726f_7175_616e, "no git checkout: fixed seed".to_string()),
            }
        };
        eprintln!("fuzz proptests: rng seed {seed} ({from}); replay with PROPTEST_RNG_SEED={seed}");
        seed
    })
}

#[test]
fn seeds_are_real_inputs_and_regressions_pass() {
    use ouro_quant::gguf::file::parse_header as gguf;
    use ouro_quant::stfile::parse_header as st;
    // the seeds exercise the success paths (a fuzzer mutating only rejected inputs learns little)
    for s in inputs("seeds", "gguf_header") {
        gguf(&s).unwrap();
    }
    for s in inputs("seeds", "safetensors_header") {
        st(&s).unwrap();
    }
    assert!(inputs("seeds", "config").iter().any(|s| OuroConfig::from_json_str(std::str::from_utf8(s).unwrap(), std::path::Path::new("c")).is_ok()));
    for (name, f) in TARGETS {
        let seeds = inputs("seeds", name);
        assert!(!seeds.is_empty(), "no seeds for {name}");
        for s in seeds.iter().chain(&inputs("regressions", name)) {
            f(s);
        }
    }
}

fn mutate(seed: &[u8], edits: &[(prop::sample::Index, u8, u8)], cut: Option<prop::sample::Index>) -> Vec<u8> {
    let mut b = seed.to_vec();
    for (i, v, op) in edits {
        if b.is_empty() {
            b.push(*v);
            continue;
        }
        let k = i.index(b.len());
        match op % 4 {
            0 => b[k] = *v,
            1 => b[k] ^= 1 << (v % 8),
            2 => b.insert(k, *v),
            _ => {
                b.remove(k);
            }
        }
    }
    if let Some(c) = cut {
        let k = c.index(b.len() + 1);
        b.truncate(k);
    }
    b
}

fn valid_file() -> Vec<u8> {
    let json = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json);
    v.extend_from_slice(&[0u8; 22]);
    v
}

fn check_consistent(buf: &[u8]) {
    fuzzing::safetensors_header(buf);
}

/// Our header parser and the `safetensors` crate on the same bytes: both accept or both refuse,
/// and what both accept describes the same tensors (name, dtype, shape, byte range). Returns
/// whether they accepted. Backs docs/hardening.md's "accepts what the safetensors crate accepts".
fn agrees_with_the_safetensors_crate(buf: &[u8]) -> bool {
    let ours = ouro_quant::stfile::parse_header(buf);
    let theirs = safetensors::SafeTensors::deserialize(buf);
    match (&ours, &theirs) {
        (Ok(h), Ok(st)) => {
            let mut a: Vec<(String, String, Vec<usize>, usize)> =
                h.tensors.iter().map(|t| (t.name.clone(), format!("{:?}", t.dtype).replace('_', "").to_uppercase(), t.shape.clone(), t.end - t.begin)).collect();
            let mut b: Vec<(String, String, Vec<usize>, usize)> =
                st.tensors().into_iter().map(|(n, v)| (n, format!("{:?}", v.dtype()).replace('_', "").to_uppercase(), v.shape().to_vec(), v.data().len())).collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "the two parsers read different tensors");
            true
        }
        (Err(_), Err(_)) => false,
        (Ok(_), Err(e)) => panic!("we accept what the safetensors crate refuses ({e:?})"),
        (Err(e), Ok(st)) => {
            // the one difference allowed: a dtype the crate knows that we refuse by name (none
            // of the generated ones today; new crate versions add sub-byte and exotic floats)
            let exotic = st.tensors().iter().any(|(_, v)| !matches!(format!("{:?}", v.dtype()).as_str(), "F32" | "F16" | "BF16" | "F64" | "I8" | "U8" | "I16" | "U16" | "I32" | "U32" | "I64" | "U64" | "BOOL"));
            assert!(exotic, "we refuse what the safetensors crate accepts: {e}");
            false
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        rng_seed: proptest::test_runner::RngSeed::Fixed(commit_seed()),
        .. ProptestConfig::default()
    })]

    #[test]
    fn mutated_seeds_keep_every_property(
        target in 0usize..4,
        seed in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (name, f) = TARGETS[target];
        let seeds = inputs("seeds", name);
        f(&mutate(&seeds[seed.index(seeds.len())], &edits, cut));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_consistent(&bytes);
    }

    #[test]
    fn the_safetensors_crate_agrees_on_mutated_files(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = valid_file();
        for (i, v) in edits {
            let k = i.index(b.len());
            b[k] = v;
        }
        if let Some(c) = cut {
            let k = c.index(b.len() + 1);
            b.truncate(k);
        }
        agrees_with_the_safetensors_crate(&b);
    }

    #[test]
    fn the_safetensors_crate_agrees_on_header_shapes(
        entries in proptest::collection::vec((
            "(a|b|c|__metadata__)",
            "(F32|BF16|F16|F64|I64|I32|U8|I8|BOOL|F8_E4M3|F8_E5M2|X)",
            proptest::collection::vec(0usize..5, 0..3),
            prop_oneof![8 => Just(0i64), 1 => Just(-1i64), 1 => Just(1i64)],
        ), 0..4),
        extra in prop_oneof![8 => Just(0usize), 1 => 1usize..4],
    ) {
        // byte ranges that tile the data section in order, unless a slip moves one end
        let size = |d: &str| match d { "F64" | "I64" => 8, "F32" | "I32" => 4, "BF16" | "F16" => 2, _ => 1 };
        let mut obj = serde_json::Map::new();
        let mut at = 0i64;
        for (name, dtype, shape, slip) in entries {
            let len = (shape.iter().product::<usize>() * size(&dtype)) as i64;
            let end = (at + len + slip).max(at);
            obj.insert(name, serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, end]}));
            at = end;
        }
        let json = serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap();
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(&json);
        v.extend(std::iter::repeat_n(0u8, at as usize + extra));
        agrees_with_the_safetensors_crate(&v);
    }

    #[test]
    fn mutated_valid_files_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut b = valid_file();
        for (i, v) in edits {
            let k = i.index(b.len());
            b[k] = v;
        }
        if do_cut {
            let k = cut.index(b.len());
            b.truncate(k);
        }
        check_consistent(&b);
    }

    #[test]
    fn header_json_shapes_never_panic(
        dtype in "(F32|BF16|F16|I64|U8|BOOL|F8_E4M3|X)",
        shape in proptest::collection::vec(0u64..u64::MAX, 0..4),
        begin in 0u64..64, len in 0u64..64, extra in 0usize..80,
    ) {
        let json = serde_json::json!({"t": {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + len]}});
        let json = serde_json::to_vec(&json).unwrap();
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(&json);
        v.extend(std::iter::repeat_n(0u8, extra));
        check_consistent(&v);
    }

    #[test]
    fn config_text_never_panics(text in "\\PC{0,200}") {
        fuzzing::config(text.as_bytes());
    }

    #[test]
    fn config_values_never_panic(
        key in "(hidden_size|vocab_size|intermediate_size|num_hidden_layers|max_position_embeddings|num_attention_heads|num_key_value_heads|head_dim|total_ut_steps|early_exit_step|early_exit_threshold|rope_theta|eos_token_id|layer_types)",
        value in prop_oneof![
            any::<i64>().prop_map(|x| serde_json::json!(x)),
            any::<f64>().prop_map(|x| serde_json::json!(x)),
            "\\PC{0,8}".prop_map(|s| serde_json::json!(s)),
            Just(serde_json::json!(null)),
            Just(serde_json::json!([1, "a"])),
        ],
    ) {
        let mut c: serde_json::Value = serde_json::from_str(include_str!("../fixtures/golden/mha_f32/config.json")).unwrap();
        c[&key] = value;
        fuzzing::config(c.to_string().as_bytes());
    }
}
