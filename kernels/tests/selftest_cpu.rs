//! The kernel self-test on the CPU: every case of `moe_kernels::selftest` through the public ops, which on
//! the CPU run the references. Checks the harness itself (cases build, shapes line up, nmse 0, the table
//! prints) and, with the `vs_candle` cases, the references against candle's composite ops; the comparison
//! of the kernels themselves runs with `moe-run selftest --device cuda` on a GPU machine.

use candle_core::Device;

#[test]
fn cpu_selftest_passes() {
    let report =
        moe_kernels::selftest::run(&moe_kernels::selftest::Target::Device(Device::Cpu), None)
            .unwrap();
    println!("{}", report.table());
    for op in moe_kernels::selftest::ops() {
        assert!(report.rows.iter().any(|r| r.op == op), "no case for {op}");
    }
    assert!(
        report
            .rows
            .iter()
            .filter(|r| r.op != "vs_candle")
            .all(|r| r.nmse == 0.0),
        "the CPU runs the references themselves"
    );
    // The references against candle's composite ops: only the summation order differs.
    let vs: Vec<_> = report.rows.iter().filter(|r| r.op == "vs_candle").collect();
    assert!(vs.len() >= 7, "one composite case per op family");
    report.ensure_passed().unwrap();
}

#[test]
fn filter_selects_one_op() {
    let report = moe_kernels::selftest::run(
        &moe_kernels::selftest::Target::Device(Device::Cpu),
        Some("dispatch"),
    )
    .unwrap();
    assert!(!report.rows.is_empty());
    assert!(report.rows.iter().all(|r| r.op == "dispatch"));
}
