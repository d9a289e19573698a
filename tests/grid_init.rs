//! The lattice i-quants' search grids are built at first use, from inside the quantizer's and the
//! runner's rayon jobs. Building one must not re-enter its own lazy initialisation: a rayon worker
//! that waits inside an initialiser for parallel work may run another job meanwhile, and if that
//! job asks for the same grid, the thread waits for itself forever (CI hung this way for 90
//! minutes in `convert` and `run` on i-quant files). This file is its own test binary so that the
//! grids start unbuilt here, whatever other tests do.

use std::sync::mpsc;
use std::time::Duration;

use ouro_quant::quant::{self, ggml::GgmlType};
use rayon::prelude::*;

const LATTICE: [GgmlType; 7] =
    [GgmlType::IQ3_XXS, GgmlType::IQ3_S, GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ2_S, GgmlType::IQ1_S, GgmlType::IQ1_M];

/// Many rayon jobs, on more threads than cores, each quantizing and decoding a block of every
/// lattice type in its own order, all before any grid exists; must finish (each job checks that
/// its block decodes to finite values of the right count).
#[test]
fn grids_built_from_many_rayon_jobs_at_once_do_not_deadlock() {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(8).build().expect("a rayon pool");
        let decoded: usize = pool.install(|| {
            (0..512usize)
                .into_par_iter()
                .map(|job| {
                    let x: Vec<f32> = (0..256).map(|i| (((i * 37 + job * 11) % 101) as f32 - 50.0) / 25.0).collect();
                    let imatrix = vec![1.0f32; 256];
                    let ty = LATTICE[job % LATTICE.len()];
                    let mut bytes = Vec::new();
                    assert!(quant::quantize_row(ty, &x, Some(&imatrix), &mut bytes), "{ty:?} quantizes");
                    let mut back = Vec::new();
                    (quant::dequantizer(ty).expect("a dequantizer"))(&bytes, &mut back);
                    assert_eq!(back.len(), 256, "{ty:?}");
                    assert!(back.iter().all(|v| v.is_finite()), "{ty:?}");
                    1
                })
                .sum()
        });
        let _ = done.send(decoded);
    });
    match finished.recv_timeout(Duration::from_secs(300)) {
        Ok(n) => assert_eq!(n, 512),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the grids' first use from 512 rayon jobs did not finish in 300 s: deadlock"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the worker thread panicked (see above)"),
    }
}
