//! The CPU emulator of the CUDA kernels can fail: broken test-only kernels (kernels/emu/test_kernels.cu) are
//! caught with a message naming the kernel, the site and the lanes or buffer, and a correct one passes.
use moe_kernels::emu::{launch_raw, EmuArg, EmuBuf};

fn floats(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read(b: &EmuBuf) -> Vec<f32> {
    b.bytes()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn err(entry: &str, grid: u32, block: u32, args: &[EmuArg]) -> String {
    match launch_raw(entry, [grid, 1, 1], [block, 1, 1], args) {
        Ok(()) => panic!("{entry}: the emulator accepted a broken kernel"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn correct_block_reduction_passes() {
    let n = 1000usize;
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
    let input = EmuBuf::from_bytes(&floats(&x), 4, "in", true).unwrap();
    let out = EmuBuf::new(4, 4, "out").unwrap();
    launch_raw(
        "emu_test_block_sum",
        [1, 1, 1],
        [256, 1, 1],
        &[
            EmuArg::Buf(&input),
            EmuArg::Buf(&out),
            EmuArg::U32(n as u32),
        ],
    )
    .unwrap();
    assert_eq!(read(&out), vec![x.iter().sum::<f32>()]);
}

#[test]
fn divergent_shuffle_is_caught() {
    let out = EmuBuf::new(32 * 4, 4, "out").unwrap();
    let e = err("emu_test_divergent_shfl", 1, 32, &[EmuArg::Buf(&out)]);
    assert!(
        e.contains("emu_test_divergent_shfl")
            && e.contains("__shfl_xor_sync")
            && e.contains("lanes 16-31 exited")
            && e.contains("lanes 0-15 wait"),
        "{e}"
    );
}

#[test]
fn divergent_barrier_is_caught() {
    let out = EmuBuf::new(64 * 4, 4, "out").unwrap();
    let e = err("emu_test_divergent_barrier", 1, 64, &[EmuArg::Buf(&out)]);
    assert!(
        e.contains("__syncthreads") && e.contains("reached by 32 of 64") && e.contains("32-63"),
        "{e}"
    );
}

#[test]
fn out_of_bounds_write_into_the_canary_is_caught() {
    // 30 floats end 8 bytes before the guard page: threads 30 and 31 write into the canary bytes.
    let out = EmuBuf::new(30 * 4, 4, "out").unwrap();
    let e = err(
        "emu_test_oob_write",
        1,
        32,
        &[EmuArg::Buf(&out), EmuArg::U32(30)],
    );
    assert!(
        e.contains("out-of-bounds write 0 bytes past the end of argument 'out' (120 bytes)"),
        "{e}"
    );
}

#[test]
fn out_of_bounds_write_far_past_the_end_faults() {
    let out = EmuBuf::new(32 * 4, 4, "out").unwrap();
    let e = err(
        "emu_test_oob_write",
        4,
        32,
        &[EmuArg::Buf(&out), EmuArg::U32(32)],
    );
    assert!(
        e.contains("segmentation fault")
            && e.contains("bytes past the end of argument 'out' (128 bytes)"),
        "{e}"
    );
    // The emulator is still usable after a caught fault.
    correct_block_reduction_passes();
}

#[test]
fn write_into_a_read_only_input_faults() {
    let input = EmuBuf::from_bytes(&floats(&[1.0; 32]), 4, "in", true).unwrap();
    let out = EmuBuf::new(32 * 4, 4, "out").unwrap();
    let e = err(
        "emu_test_write_input",
        1,
        32,
        &[EmuArg::Buf(&input), EmuArg::Buf(&out)],
    );
    assert!(
        e.contains("argument 'in'") && e.contains("read-only input"),
        "{e}"
    );
}

#[test]
fn misaligned_vector_load_is_caught() {
    let input = EmuBuf::from_bytes(&floats(&[1.0; 64]), 4, "in", true).unwrap();
    let out = EmuBuf::new(32 * 4, 4, "out").unwrap();
    let e = err(
        "emu_test_misaligned_ldg",
        1,
        32,
        &[EmuArg::Buf(&input), EmuArg::Buf(&out)],
    );
    assert!(
        e.contains("__ldg") && e.contains("not 16-byte aligned"),
        "{e}"
    );
}

#[test]
fn missing_barrier_reads_stale_shared_memory() {
    // Correct would be out[b*64 + t] = b*100 + (t+1)%64; without a barrier the emulator's thread order makes
    // the reads see another block's (or no) write.
    let out = EmuBuf::new(2 * 64 * 4, 4, "out").unwrap();
    launch_raw(
        "emu_test_missing_barrier",
        [2, 1, 1],
        [64, 1, 1],
        &[EmuArg::Buf(&out)],
    )
    .unwrap();
    let got = read(&out);
    let want: Vec<f32> = (0..128)
        .map(|i| ((i / 64) * 100 + (i % 64 + 1) % 64) as f32)
        .collect();
    assert_ne!(got, want, "the race went unnoticed");
}

#[test]
fn missing_barrier_between_warps_reads_the_next_tile() {
    // Correct would be out[t] = (0 + u) + (1000 + u) with u = (t + 32) % 64; without the loop's trailing barrier
    // one warp stages step 1 before the other has read step 0.
    let out = EmuBuf::new(64 * 4, 4, "out").unwrap();
    launch_raw(
        "emu_test_missing_loop_barrier",
        [1, 1, 1],
        [64, 1, 1],
        &[EmuArg::Buf(&out)],
    )
    .unwrap();
    let got = read(&out);
    let want: Vec<f32> = (0..64)
        .map(|t| (2 * ((t + 32) % 64) + 1000) as f32)
        .collect();
    assert_ne!(got, want, "the race between warps went unnoticed");
}

#[test]
fn launch_contract_is_checked() {
    let out = EmuBuf::new(4, 4, "out").unwrap();
    // Wrong argument list.
    let e = err("emu_test_block_sum", 1, 256, &[EmuArg::Buf(&out)]);
    assert!(
        e.contains("takes (p4 p4 u4) but the launcher passed (p4)"),
        "{e}"
    );
    // A u16 buffer where the kernel reads floats.
    let half = EmuBuf::new(8, 2, "half").unwrap();
    let e = err(
        "emu_test_block_sum",
        1,
        256,
        &[EmuArg::Buf(&half), EmuArg::Buf(&out), EmuArg::U32(1)],
    );
    assert!(e.contains("passed (p2 p4 u4)"), "{e}");
    // Over the launch bounds, empty grid, unknown entry.
    let input = EmuBuf::new(4, 4, "in").unwrap();
    let args = [EmuArg::Buf(&input), EmuArg::Buf(&out), EmuArg::U32(1)];
    assert!(err("emu_test_block_sum", 1, 512, &args).contains("__launch_bounds__(256)"));
    assert!(err("emu_test_block_sum", 0, 256, &args).contains("empty grid"));
    assert!(err("no_such_kernel", 1, 32, &args)
        .contains("no kernel entry point named 'no_such_kernel'"));
}

/// `moe-run selftest --device emu`: every op family's cases run through the kernels' own source, against the
/// CPU references, with the same named budgets as on a GPU.
#[test]
fn every_kernel_case_passes_on_the_emulator() {
    let report = moe_kernels::selftest::run(&moe_kernels::selftest::Target::Emu, None).unwrap();
    println!("{}", report.table());
    for op in moe_kernels::selftest::ops() {
        assert!(
            report.rows.iter().any(|r| r.op == op),
            "no emulated case for {op}"
        );
    }
    report.ensure_passed().unwrap();
}

/// Whole-model parity on emulated kernels: the kernel execution path (routing on the device, fused norms, decode
/// attention, the expert kernels) with every op running as an emulated kernel, against the candle path on the
/// CPU, prompt plus decode steps, on tiny-kjv and every parity fixture (top-1 equal in f32).
#[test]
fn whole_model_parity_on_emulated_kernels() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let report = moe::selftest::run(
        &moe_kernels::selftest::Target::Emu,
        Some("model"),
        Some(&root),
    )
    .unwrap();
    println!("{}", report.table());
    for name in [
        "tiny-kjv",
        "deepseek-v3",
        "deepseek-v2-group",
        "mixtral-base",
        "qwen3-moe",
        "dbrx",
    ] {
        assert!(
            report
                .rows
                .iter()
                .any(|r| r.case.starts_with(&format!("{name} "))),
            "no emulated model case for {name}"
        );
    }
    report.ensure_passed().unwrap();
}
