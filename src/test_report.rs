//! What the test suite could and could not exercise on this machine, said aloud: tests call
//! [`note`] with a line such as `ran: avx2 kernels against the portable definition` or
//! `NOT RUN here: avx512vnni kernels (this CPU lacks avx512vnni)`, and `scripts/test.sh` prints
//! the collected lines at the end of the run, so that a reader of CI's output sees which
//! instruction-set paths and environment-dependent checks really ran (cargo hides a passing
//! test's own output). Without `OURO_QUANT_TEST_REPORT` (a folder) it does nothing.

use std::io::Write;

/// Appends `line` to `$OURO_QUANT_TEST_REPORT/report.txt` (one `write` per line, so lines of tests
/// running in parallel do not interleave).
pub fn note(line: &str) {
    let Some(dir) = std::env::var_os("OURO_QUANT_TEST_REPORT") else { return };
    let path = std::path::Path::new(&dir).join("report.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}
