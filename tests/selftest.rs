//! `moe-run selftest`'s whole-model cases on the CPU: the kernel execution path against the candle
//! path on the embedded model and every parity fixture (on a GPU the same cases check the CUDA path).

mod common;

use candle_core::Device;
use common::{fixture, FIXTURES};

#[test]
fn model_cases_pass_on_the_cpu() {
    let root = fixture("");
    let report = moe::selftest::run(
        &moe_kernels::selftest::Target::Device(Device::Cpu),
        Some("model"),
        Some(&root),
    )
    .unwrap();
    println!("{}", report.table());
    assert!(report.rows.iter().all(|r| r.op == "model"));
    // tiny-kjv f32, bf16, int4, and int4 and int8 with bf16 activations, then one row per fixture and
    // gpt-oss-mxfp4 with bf16 activations.
    assert_eq!(report.rows.len(), 5 + FIXTURES.len() + 1);
    assert!(report
        .rows
        .iter()
        .any(|r| r.case.starts_with("gpt-oss-mxfp4 bf16 vs f32 ")));
    for name in FIXTURES {
        assert!(
            report
                .rows
                .iter()
                .any(|r| r.case.starts_with(&format!("{name} "))),
            "no model case for {name}"
        );
    }
    report.ensure_passed().unwrap();
}
