//! Property tests (the fuzzing of the parsers): no input makes the safetensors header parser or the
//! config parser panic, and a header that parses is internally consistent.

use proptest::prelude::*;

use ouro_quant::checkpoint::OuroConfig;
use ouro_quant::stfile::parse_header;

fn valid_file() -> Vec<u8> {
    let json = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json);
    v.extend_from_slice(&[0u8; 22]);
    v
}

fn check_consistent(buf: &[u8]) {
    if let Ok(h) = parse_header(buf) {
        let data_len = buf.len() - h.data_start();
        let mut pos = 0;
        for t in &h.tensors {
            assert_eq!(t.begin, pos);
            assert_eq!(t.nbytes(), t.numel() * t.dtype.size());
            pos = t.end;
        }
        assert_eq!(pos, data_len);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_consistent(&bytes);
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
        let _ = OuroConfig::from_json_str(&text, std::path::Path::new("config.json"));
    }

    #[test]
    fn config_values_never_panic(
        key in "(hidden_size|num_attention_heads|num_key_value_heads|head_dim|total_ut_steps|early_exit_step|early_exit_threshold|rope_theta|eos_token_id|layer_types)",
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
        let _ = OuroConfig::from_json_str(&c.to_string(), std::path::Path::new("config.json"));
    }
}
