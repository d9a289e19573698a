//! Our quantizers against ggml's own bytes (fixtures/golden/ggml: `ggml_quantize_chunk` on 8 x 512
//! matrices from five distributions, without importance matrix), byte for byte.

mod common;

use ouro_quant::quant::ggml::GgmlType;
use ouro_quant::quant::{has_quantizer, legacy, quantize_row};
use ouro_quant::stfile::SafetensorsFile;

const DISTS: [&str; 5] = ["normal", "outliers", "special_rows", "uniform", "alternating"];

fn vectors() -> SafetensorsFile {
    SafetensorsFile::open(common::fixtures().join("golden/ggml/vectors.safetensors")).unwrap()
}

fn input(f: &SafetensorsFile, dist: &str) -> Vec<f32> {
    f.bytes(&format!("{dist}.input")).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn implemented_types_match_ggml_byte_for_byte() {
    let f = vectors();
    let mut checked = 0;
    for ty in GgmlType::ALL {
        // (the i-quants' bytes other than IQ4_NL's are in vectors_iq.safetensors:
        // iq4_xs_matches_ggml_byte_for_byte, iq_lattice_types_match_ggml_byte_for_byte)
        if !has_quantizer(ty) || ty == GgmlType::F32 || (ty.name().starts_with("IQ") && ty != GgmlType::IQ4_NL) {
            continue;
        }
        for dist in DISTS {
            let x = input(&f, dist);
            let want = f.bytes(&format!("{dist}.{}", ty.name())).unwrap_or_else(|| panic!("{dist}.{ty}"));
            let imatrix: Vec<f32> = f.bytes(&format!("{dist}.imatrix")).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            for with_imatrix in [false, true] {
                let key = if with_imatrix { format!("{dist}.{}.imatrix", ty.name()) } else { format!("{dist}.{}", ty.name()) };
                // F16, BF16 and Q8_0 ignore the importance vector; ggml stored no separate bytes
                let Some(want) = f.bytes(&key).or(if with_imatrix { None } else { Some(want) }) else { continue };
                let mut got = Vec::new();
                for row in x.chunks_exact(512) {
                    assert!(quantize_row(ty, row, with_imatrix.then_some(imatrix.as_slice()), &mut got));
                }
                assert_eq!(got.len(), want.len(), "{key}");
                if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                    let blk = i / ty.block_bytes();
                    panic!("{key}: first differing byte {i} (row {}, block {blk}): ours {} ggml {}", i / ty.row_bytes(512), got[i], want[i]);
                }
                checked += 1;
            }
        }
    }
    // 13 types without, 10 with an importance vector (F16, BF16, Q8_0 ignore it)
    assert_eq!(checked, 13 * 5 + 10 * 5);
}

#[test]
fn dequantize_inverts_within_the_type_error() {
    let f = vectors();
    let x = input(&f, "normal");
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    // relative RMSE from the golden README's table (normal column, printed to 4 decimals; the
    // README's vectors.json holds 6: 0.086181, 0.078319, 0.042935, 0.038397, 0.005419). Ours
    // measured 0.0861813, 0.0783193, 0.0429354, 0.0383968, 0.0054193: within the printing's 5e-5
    for (ty, bound) in [
        (GgmlType::Q4_0, 0.0862),
        (GgmlType::Q4_1, 0.0783),
        (GgmlType::Q5_0, 0.0429),
        (GgmlType::Q5_1, 0.0384),
        (GgmlType::Q8_0, 0.0054),
    ] {
        let mut q = Vec::new();
        quantize_row(ty, &x, None, &mut q);
        let mut y = Vec::new();
        legacy::dequantize_legacy(ty, &q, &mut y);
        let err = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / x.len() as f32).sqrt() / rms;
        assert!((err - bound).abs() <= 5e-5, "{ty}: relative RMSE {err}, ggml's {bound}");
    }
}

/// IQ4_XS against ggml 0.25.3's bytes (`vectors_iq.safetensors`, from the same recipe as the other
/// vectors): with and without an importance vector, every distribution.
#[test]
fn iq4_xs_matches_ggml_byte_for_byte() {
    let f = SafetensorsFile::open(common::fixtures().join("golden/ggml/vectors_iq.safetensors")).unwrap();
    let floats = |name: &str| -> Vec<f32> { f.bytes(name).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect() };
    for dist in DISTS {
        let x = floats(&format!("{dist}.input"));
        let imatrix = floats(&format!("{dist}.imatrix"));
        for with_imatrix in [false, true] {
            let key = format!("{dist}.IQ4_XS{}", if with_imatrix { ".imatrix" } else { "" });
            let want = f.bytes(&key).unwrap_or_else(|| panic!("{key}"));
            let mut got = Vec::new();
            for row in x.chunks_exact(512) {
                assert!(quantize_row(GgmlType::IQ4_XS, row, with_imatrix.then_some(imatrix.as_slice()), &mut got));
            }
            assert_eq!(got.len(), want.len(), "{key}");
            for (r, (g, w)) in got.chunks(272).zip(want.chunks(272)).enumerate() {
                assert!(g == w, "{key} row {r}: bytes differ from ggml's");
            }
        }
    }
}

/// The lattice i-quants against ggml 0.25.3's bytes: `vectors_iq.safetensors` (five
/// distributions) and `vectors_iq_edge.safetensors` (zero groups mid-block, values at the zero
/// thresholds, ties, one large negative per 8, sparse rows, an importance vector with zeros;
/// scripts/golden/iq_edge_vectors.py), with the importance vector and (for the types ggml
/// quantizes without one) without.
#[test]
fn iq_lattice_types_match_ggml_byte_for_byte() {
    use ouro_quant::quant::{iq1, iq2, iq3};
    type Quantize = fn(&[f32], Option<&[f32]>, &mut Vec<u8>);
    let types: [(&str, Quantize, usize, bool); 7] = [
        ("IQ3_XXS", iq3::quantize_iq3_xxs, 196, false),
        ("IQ3_S", iq3::quantize_iq3_s, 220, false),
        ("IQ2_XXS", |x, q, out| iq2::quantize_iq2_xxs(x, q.unwrap(), out), 132, true),
        ("IQ2_XS", |x, q, out| iq2::quantize_iq2_xs(x, q.unwrap(), out), 148, true),
        ("IQ2_S", iq2::quantize_iq2_s, 164, false),
        ("IQ1_S", |x, q, out| iq1::quantize_iq1_s(x, q.unwrap(), out), 100, true),
        ("IQ1_M", iq1::quantize_iq1_m, 112, false),
    ];
    let mut failures = vec![];
    let mut compared = 0;
    for (file, dists) in [("vectors_iq", &DISTS[..]), ("vectors_iq_edge", &["zero_groups", "ties_and_tiny", "one_negative", "sparse"][..])] {
        let f = SafetensorsFile::open(common::fixtures().join(format!("golden/ggml/{file}.safetensors"))).unwrap();
        let floats = |name: &str| -> Vec<f32> { f.bytes(name).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect() };
        for (name, quantize, row_bytes, needs_imatrix) in types {
            for dist in dists {
                let x = floats(&format!("{dist}.input"));
                let imatrix = floats(&format!("{dist}.imatrix"));
                for with_imatrix in [false, true] {
                    if needs_imatrix && !with_imatrix {
                        continue;
                    }
                    let key = format!("{dist}.{name}{}", if with_imatrix { ".imatrix" } else { "" });
                    let want = f.bytes(&key).unwrap_or_else(|| panic!("{file}: {key}"));
                    let mut got = Vec::new();
                    for row in x.chunks_exact(512) {
                        quantize(row, with_imatrix.then_some(imatrix.as_slice()), &mut got);
                    }
                    assert_eq!(got.len(), want.len(), "{key}");
                    for (r, (g, w)) in got.chunks(row_bytes).zip(want.chunks(row_bytes)).enumerate() {
                        if g != w {
                            let at = g.iter().zip(w).position(|(a, b)| a != b).unwrap();
                            failures.push(format!("{file} {key} row {r}: first differing byte {at}"));
                        }
                    }
                    compared += 1;
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} rows differ from ggml's:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(compared, 55 + 44, "every golden i-quant tensor compared");
}

/// gguf-py reads the lattice i-quants as our dequantizers do: the same byte grids point by point,
/// and the same floats from every golden block tensor (ggml's bytes).
#[test]
fn iq_lattice_types_dequantize_as_gguf_py_reads_them() {
    use ouro_quant::quant::{iq1, iq2, iq3};
    let py = std::env::var("OURO_QUANT_PYTHON").expect("OURO_QUANT_PYTHON (scripts/test.sh sets it)");
    let golden = common::fixtures().join("golden/ggml/vectors_iq.safetensors");
    let out = tempfile::tempdir().unwrap();
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/iq_dequant.py");
    let o = std::process::Command::new(py).arg(script).arg(&golden).arg(out.path()).output().unwrap();
    assert!(o.status.success(), "gguf-py: {}", String::from_utf8_lossy(&o.stderr));
    let read = |name: &str| -> Vec<f32> {
        std::fs::read(out.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}")).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let grids: [(&str, Vec<f32>); 6] = [
        ("IQ3_XXS", iq3::grid_values(256)),
        ("IQ3_S", iq3::grid_values(512)),
        ("IQ2_XXS", iq2::grid_values(256)),
        ("IQ2_XS", iq2::grid_values(512)),
        ("IQ2_S", iq2::grid_values(1024)),
        ("IQ1_S", iq1::grid_values()),
    ];
    for (t, ours) in grids {
        assert_eq!(ours, read(&format!("grid.{t}.f32")), "{t}: grid values");
    }
    type Dequantize = fn(&[u8], &mut Vec<f32>);
    let types: [(&str, Dequantize); 7] = [
        ("IQ3_XXS", iq3::dequantize_iq3_xxs),
        ("IQ3_S", iq3::dequantize_iq3_s),
        ("IQ2_XXS", iq2::dequantize_iq2_xxs),
        ("IQ2_XS", iq2::dequantize_iq2_xs),
        ("IQ2_S", iq2::dequantize_iq2_s),
        ("IQ1_S", iq1::dequantize_iq1_s),
        ("IQ1_M", iq1::dequantize_iq1_m),
    ];
    let f = SafetensorsFile::open(&golden).unwrap();
    let mut compared = 0;
    for (t, dequantize) in types {
        for dist in DISTS {
            for suffix in ["", ".imatrix"] {
                let key = format!("{dist}.{t}{suffix}");
                let Some(bytes) = f.bytes(&key) else { continue };
                let mut ours = Vec::new();
                dequantize(bytes, &mut ours);
                let theirs = read(&format!("{key}.f32"));
                assert_eq!(ours.len(), 8 * 512, "{key}");
                // the same products of the same floats: bit for bit
                let differ = ours.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differ, 0, "{key}: {differ} values differ from gguf-py's");
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 55, "every golden i-quant tensor compared");
}
