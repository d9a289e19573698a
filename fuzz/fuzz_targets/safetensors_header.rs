#![no_main]
//! See `ouro_quant::fuzzing::safetensors_header` for the property checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ouro_quant::fuzzing::safetensors_header(data));
