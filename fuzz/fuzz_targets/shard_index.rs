#![no_main]
//! See `ouro_quant::fuzzing::shard_index` for the property checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ouro_quant::fuzzing::shard_index(data));
