//! The quantized matmul kernels' own CUDA source on the CPU emulator (feature `emu`): every qmatmul and
//! qmatmul_moe self-test case (INT8, INT4, MXFP4; GEMV and GEMM paths) against the CPU reference with the
//! same named budgets as on a GPU. `cargo test -p moe-kernels --features emu`; the workspace's tests/emu.rs
//! runs every op family the same way.
#![cfg(feature = "emu")]

use moe_kernels::selftest::{run, Target};

#[test]
fn qmatmul_cases_pass_on_the_emulator() {
    let report = run(&Target::Emu, Some("qmatmul")).unwrap();
    println!("{}", report.table());
    for op in ["qmatmul", "qmatmul_moe"] {
        let mx = report
            .rows
            .iter()
            .filter(|r| r.op == op && r.case.contains("mxfp4"))
            .count();
        assert!(mx >= 10, "{op}: only {mx} mxfp4 cases");
    }
    report.ensure_passed().unwrap();
}
