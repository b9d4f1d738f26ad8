//! The CPU emulator of the CUDA kernels can fail: broken test-only kernels (kernels/emu/test_kernels.cu) are
//! caught with a message naming the kernel, the site and the lanes or buffer, and a correct one passes.
use moe_kernels::emu::{launch_raw, EmuArg, EmuBuf};

mod common;

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

/// `__shared__` arrays end at a guard page too (build.rs rewrites their declarations): a block of 64 threads
/// staging into a 32-float array faults and the report names the array, its size and its line; with 32
/// threads the same kernel is fine.
#[test]
fn shared_array_overflow_faults_and_names_the_array() {
    let out = EmuBuf::new(64 * 4, 4, "out").unwrap();
    let e = err("emu_test_shared_overflow", 1, 64, &[EmuArg::Buf(&out)]);
    assert!(
        e.contains("segmentation fault")
            && e.contains("past the end of the __shared__ array stage (128 bytes, declared at test_kernels.cu:"),
        "{e}"
    );
    // One element past the end lands in the canary bytes before the guard page (the array sits 4 bytes
    // further from it: a float array is only 4-byte aligned), found after the launch.
    let e = err("emu_test_shared_overflow", 1, 33, &[EmuArg::Buf(&out)]);
    assert!(
        e.contains("a write 0 bytes past the end of the __shared__ array stage (128 bytes")
            && e.contains("found after the launch"),
        "{e}"
    );
    let ok = EmuBuf::new(32 * 4, 4, "out").unwrap();
    launch_raw(
        "emu_test_shared_overflow",
        [1, 1, 1],
        [32, 1, 1],
        &[EmuArg::Buf(&ok)],
    )
    .unwrap();
}

/// The tensor-core collective (`mma_16816` in common.cuh, a warp collective in the emulator): fragments built
/// from PTX ISA's per-element formulas give D = C + A B (bf16 inputs, f32 sums, exact here: the values are small
/// multiples of 1/8), in both warps of a block; a block whose second warp is partial is refused.
#[test]
fn mma_16816_multiplies_fragments_in_the_ptx_layout() {
    let bf16 = |v: f32| ((v.to_bits() + 0x8000) >> 16) as u16; // exact for these values
    let a: Vec<f32> = (0..256)
        .map(|i| ((i * 7 % 23) as f32 - 11.0) / 8.0)
        .collect();
    let b: Vec<f32> = (0..128)
        .map(|i| ((i * 5 % 19) as f32 - 9.0) / 4.0)
        .collect();
    let c: Vec<f32> = (0..128).map(|i| (i % 13) as f32 - 6.0).collect();
    let bytes16 =
        |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|&x| bf16(x).to_le_bytes()).collect() };
    let ab = EmuBuf::from_bytes(&bytes16(&a), 2, "a", true).unwrap();
    let bb = EmuBuf::from_bytes(&bytes16(&b), 2, "b", true).unwrap();
    let cb = EmuBuf::from_bytes(&floats(&c), 4, "c", true).unwrap();
    let d = EmuBuf::new(256 * 4, 4, "d").unwrap();
    let args = [
        EmuArg::Buf(&ab),
        EmuArg::Buf(&bb),
        EmuArg::Buf(&cb),
        EmuArg::Buf(&d),
    ];
    launch_raw("emu_test_mma_16816", [1, 1, 1], [64, 1, 1], &args).unwrap();
    let mut want = vec![0f32; 128];
    for i in 0..16 {
        for j in 0..8 {
            want[i * 8 + j] =
                c[i * 8 + j] + (0..16).map(|k| a[i * 16 + k] * b[k * 8 + j]).sum::<f32>();
        }
    }
    let got = read(&d);
    assert_eq!(&got[..128], &want[..]);
    assert_eq!(&got[128..], &want[..]);
    let e = err("emu_test_mma_16816", 1, 48, &args);
    assert!(
        e.contains("mma.sync") && e.contains("beyond the block"),
        "{e}"
    );
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
fn misaligned_shared_and_global_accesses_are_caught() {
    // Plain typed accesses, not __ldg: the alignment check is compiled into every load and store.
    let out = EmuBuf::new(128 * 4, 4, "out").unwrap();
    let e = err("emu_test_misaligned_shared", 1, 32, &[EmuArg::Buf(&out)]);
    assert!(
        e.contains("misaligned")
            && e.contains("uint4")
            && e.contains("not 16-byte aligned")
            && e.contains("byte 4 of the __shared__ array s")
            && e.contains("test_kernels.cu:"),
        "{e}"
    );
    let e = err("emu_test_misaligned_store", 1, 32, &[EmuArg::Buf(&out)]);
    assert!(
        e.contains("misaligned store to")
            && e.contains("float2")
            && e.contains("not 8-byte aligned")
            && e.contains("byte 4 of argument 'out'"),
        "{e}"
    );
}

#[test]
fn unwritten_shared_memory_reads_as_poison_in_every_block() {
    // Shared memory starts each block undefined: block 0 writes all 32 entries, block 1 only the first
    // 16, and its other 16 read as NaN (0xFF bytes), not block 0's values (or zeros).
    let out = EmuBuf::new(2 * 32 * 4, 4, "out").unwrap();
    launch_raw(
        "emu_test_uninit_shared",
        [2, 1, 1],
        [32, 1, 1],
        &[EmuArg::Buf(&out)],
    )
    .unwrap();
    let got = read(&out);
    assert_eq!(&got[..32], &[1.0; 32]);
    assert_eq!(&got[32..48], &[2.0; 16]);
    assert!(got[48..].iter().all(|v| v.is_nan()), "{:?}", &got[48..]);
}

#[test]
fn ldg_of_a_buffer_the_kernel_may_write_is_caught() {
    let out = EmuBuf::new(32 * 4, 4, "out").unwrap();
    let e = err("emu_test_ldg_output", 1, 32, &[EmuArg::Buf(&out)]);
    assert!(
        e.contains("__ldg at") && e.contains("reads argument 'out'") && e.contains("non-const"),
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
    // A block bigger than a real kernel's registers leave room for (README.md's ptxas table):
    // qmatmul_moe_int4_f32 declares no __launch_bounds__ and takes 96 registers per thread, room for
    // 672 threads in 65536 registers; 1024 threads are refused before anything runs.
    let (n, u) = (EmuArg::Null, EmuArg::U32(0));
    let args = [n, n, n, n, n, n, n, u, u, u, u, u];
    let e = err("qmatmul_moe_int4_f32", 1, 1024, &args);
    assert!(
        e.contains("registers per thread") && e.contains("too many resources requested"),
        "{e}"
    );
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

/// Load options for a model on the CPU in f32 (weights quantized as `quant` says).
fn cpu_f32(quant: Option<moe::quant::QFormat>) -> moe::loader::LoadOptions {
    moe::loader::LoadOptions {
        quant,
        ..Default::default()
    }
}

/// The decode step on the kernel path launches the same moe-kernels plans at every position up to its key
/// bound: the attention kernels read position, key range and cache slot from the step table, so the entry
/// points, grids, scalars and input offsets of step p and step p + 1 are identical (what replaying one
/// captured CUDA graph for both needs; candle's own ops in the step are not recorded). Crossing a key bound
/// (256 -> 257 keys) changes exactly the decode attention launches (their grid), nothing else.
#[test]
fn decode_steps_launch_the_same_kernels_at_every_position() {
    use candle_core::{Device, Tensor};
    use moe::model::ExecPath;
    use moe_kernels::launch::record;

    let mut model = moe::loader::embedded::TINY_KJV
        .load(&cpu_f32(Some(moe::quant::QFormat::Int4 { group: 128 })))
        .unwrap();
    let mut cache = model.new_cache(1, 1024).unwrap();
    // A 250-token prompt through the CPU's candle path, then decode steps on the emulated kernels.
    model.set_exec_path(ExecPath::Candle);
    let prompt: Vec<u32> = (0..250u32).map(|i| (i * 37 + 11) % 1000).collect();
    let ids = Tensor::new(&prompt[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward(&ids, &mut cache, false, None).unwrap();
    model.set_exec_path(ExecPath::Kernels);
    let _emu = moe_kernels::emu::enable().unwrap();
    let mut step = |token: u32| {
        let ids = Tensor::new(&[token], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (logits, rec) = record(|| model.forward(&ids, &mut cache, false, None));
        assert!(logits
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
        rec
    };
    // Positions 250..=256: keys 251..=257.
    let recs: Vec<_> = (0..7u32).map(|i| step(40 + i)).collect();
    let ops = |r: &[moe_kernels::launch::Recorded]| r.iter().map(|p| p.op).collect::<Vec<_>>();
    for op in ["kv_store", "decode_attention", "qk_norm_rope", "rms_norm"] {
        assert!(
            ops(&recs[0]).iter().any(|o| o.contains(op)),
            "{op} not launched: {:?}",
            ops(&recs[0])
        );
    }
    for (i, r) in recs.iter().enumerate().take(6).skip(1) {
        assert_eq!(r, &recs[0], "step {i} launched differently from step 0");
    }
    // 257 keys pass the bound of 256: only decode attention's launches change.
    let (a, b) = (&recs[5], &recs[6]);
    assert_eq!(ops(a), ops(b));
    let changed: Vec<&str> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.op)
        .collect();
    assert!(
        !changed.is_empty() && changed.iter().all(|o| *o == "decode_attention"),
        "{changed:?}"
    );
}

/// What a CUDA graph captures, run on the emulated kernels: the step table written, then the decode step
/// in place (no table write, no cache advance) gives the eager step's logits bit for bit, at consecutive
/// positions; a model whose step reads back to the host names why ([`Model::graph_blocker`]); and off CUDA
/// the graph decoder decodes eagerly with the same tokens.
#[test]
fn the_captured_pass_equals_the_eager_step() {
    use candle_core::{Device, Tensor};
    use moe::model::ExecPath;
    use moe::runtime::graph::GraphDecoder;

    let opts = cpu_f32(None);
    let mut model = moe::loader::embedded::TINY_KJV.load(&opts).unwrap();
    assert!(model.graph_blocker().unwrap().contains("candle"));
    model.set_exec_path(ExecPath::Kernels);
    assert_eq!(model.graph_blocker(), None);
    let _emu = moe_kernels::emu::enable().unwrap();
    let ids = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let vec = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut cache = model.new_cache(1, 64).unwrap();
    model
        .forward(&ids(&[5, 77, 300, 12]), &mut cache, false, None)
        .unwrap();
    for token in [9u32, 41, 1000] {
        let eager = vec(model
            .forward(&ids(&[token]), &mut cache, false, None)
            .unwrap());
        cache.rewind(1);
        assert!(model.write_step_table(&mut cache).unwrap());
        let pass = vec(model
            .decode_step_in_place(&ids(&[token]), &mut cache)
            .unwrap());
        assert_eq!(pass, eager, "token {token}");
        cache.advance(1);
    }
    // Off CUDA and off the emulator: eager steps, the same logits as forward. (On an emulator
    // thread `new` takes the stand-in backend.)
    assert!(GraphDecoder::new(&model).active());
    let mut g = moe_kernels::emu::without(|| GraphDecoder::new(&model));
    assert!(!g.active());
    let mut a = model.new_cache(1, 16).unwrap();
    let mut b = model.new_cache(1, 16).unwrap();
    model.forward(&ids(&[5, 77]), &mut a, false, None).unwrap();
    model.forward(&ids(&[5, 77]), &mut b, false, None).unwrap();
    for token in [300u32, 12] {
        let want = vec(model.forward(&ids(&[token]), &mut a, false, None).unwrap());
        assert_eq!(vec(g.step(&model, &mut b, token).unwrap()), want);
    }
    assert_eq!((g.replays, a.len(), b.len()), (0, 4, 4));
    // A dense gpt-oss routes on the host for its experts (candle's ops).
    let mut dense = moe::loader::load_dir(&common::fixture("gpt-oss"), &opts).unwrap();
    dense.set_exec_path(ExecPath::Kernels);
    assert!(dense.graph_blocker().unwrap().contains("routing"));
}

/// Every parity fixture whose decode step can be one CUDA graph (`Model::graph_blocker` is `None`) records
/// the same moe-kernels launches at consecutive decode steps on the emulator (sliding-window rings, sinks,
/// biases, QK-norms, shared experts, MXFP4 experts among them); the ones that cannot say why.
#[test]
fn every_replayable_fixture_launches_the_same_kernels_at_consecutive_steps() {
    use candle_core::{Device, Tensor};
    use moe::model::ExecPath;
    use moe_kernels::launch::record;

    let (mut replayable, mut blocked) = (Vec::new(), Vec::new());
    for &name in common::FIXTURES {
        let name = name.to_string();
        let mut model = moe::loader::load_dir(&common::fixture(&name), &cpu_f32(None)).unwrap();
        model.set_exec_path(ExecPath::Kernels);
        if let Some(why) = model.graph_blocker() {
            blocked.push(format!("{name}: {why}"));
            continue;
        }
        let _emu = moe_kernels::emu::enable().unwrap();
        let mut cache = model.new_cache(1, 32).unwrap();
        let ids = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        model
            .forward(&ids(&[1, 2, 3, 4, 5, 6]), &mut cache, false, None)
            .unwrap();
        let recs: Vec<_> = [7u32, 8, 9]
            .iter()
            .map(|&t| record(|| model.forward(&ids(&[t]), &mut cache, false, None).unwrap()).1)
            .collect();
        assert!(!recs[0].is_empty(), "{name}: nothing launched");
        assert_eq!(recs[1], recs[0], "{name}: step 1 launched differently");
        assert_eq!(recs[2], recs[0], "{name}: step 2 launched differently");
        replayable.push(name);
    }
    println!("replayable: {replayable:?}\nblocked: {blocked:#?}");
    for name in [
        "mixtral-swa",
        "qwen3-moe",
        "gpt-oss-mxfp4",
        "dbrx",
        "qwen2-moe-swa",
        "dots1-swa",
        "llama4-scout",
        "llama4-maverick",
        "glm4-moe",
        "deepseek-v3",
        "deepseek-v2-group",
    ] {
        assert!(
            replayable.iter().any(|r| r == name),
            "{name} is not replayable: {blocked:?}"
        );
    }
    // Dense gpt-oss experts (candle's ops with host routing) are the one blocked fixture.
    assert!(
        blocked.len() == 1 && blocked[0].starts_with("gpt-oss:"),
        "{blocked:?}"
    );
}

/// INT4 tiny-kjv on the kernel path, and two identical sets of caches (1024 slots), one per prompt,
/// prefilled on the candle path: the eager reference steps one set, the graph decoder the other.
fn int4_kjv_prefilled(
    prompts: &[Vec<u32>],
) -> (
    moe::model::Model,
    Vec<moe::model::kv_cache::KvCache>,
    Vec<moe::model::kv_cache::KvCache>,
) {
    use candle_core::{Device, Tensor};
    use moe::model::ExecPath;

    let quant = Some(moe::quant::QFormat::Int4 { group: 128 });
    let mut model = moe::loader::embedded::TINY_KJV
        .load(&cpu_f32(quant))
        .unwrap();
    model.set_exec_path(ExecPath::Candle);
    let prefilled = || -> Vec<_> {
        prompts
            .iter()
            .map(|p| {
                let mut c = model.new_cache(1, 1024).unwrap();
                let ids = Tensor::new(p.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                model.forward(&ids, &mut c, false, None).unwrap();
                c
            })
            .collect()
    };
    let (a, b) = (prefilled(), prefilled());
    model.set_exec_path(ExecPath::Kernels);
    (model, a, b)
}

/// The graph decoder's bookkeeping (warm-up, capture with its replay check, replays, a new graph when
/// the key bound grows) over the emulated kernels, with the stand-in backend whose replay re-runs the
/// captured pass: every step's logits equal an eager decode's bit for bit, and the replays are the
/// steps after each bound's warm-up and capture (2 x 4 of 12 steps crossing 256 keys).
#[test]
fn the_graph_decoder_replays_what_eager_steps_compute() {
    use candle_core::{Device, Tensor};
    use moe::runtime::graph::GraphDecoder;

    let prompt: Vec<u32> = (0..250u32).map(|i| (i * 37 + 11) % 1000).collect();
    let (model, mut a, mut b) = int4_kjv_prefilled(&[prompt]);
    let (a, b) = (&mut a[0], &mut b[0]);
    let ids = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let vec = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let _emu = moe_kernels::emu::enable().unwrap();
    let mut g = GraphDecoder::emulated(&model).unwrap();
    let mut token = 40u32;
    for step in 0..12 {
        let want = vec(model.forward(&ids(&[token]), a, false, None).unwrap());
        let got = vec(g.step(&model, b, token).unwrap());
        assert_eq!(got, want, "step {step}");
        assert_eq!(b.len(), a.len());
        token = (token * 7 + 3) % 1000;
    }
    assert!(g.active());
    assert_eq!(g.replays, 8);
}

/// The graph decoder at batch 3 (bench --batch 3 --cuda-graph): three caches with ragged prompts (two
/// crossing 256 keys mid-run, at steps 3 and 6), stepped together. Every step's logits equal eager
/// `forward_batch` steps' bit for bit; the batched pass launches the same kernels at consecutive steps
/// while the bounds stay; every cache's launches are sized for the longest sequence's keys (each
/// cache's key floor), so only the longest one's crossing changes the graphs: one warm-up and one
/// capture more, 12 - 4 = 8 replays (with a bound per cache, both crossings would: 6).
#[test]
fn the_graph_decoder_replays_batched_steps() {
    use candle_core::{Device, Tensor};
    use moe::model::SeqStep;
    use moe::runtime::graph::GraphDecoder;
    use moe_kernels::launch::record;

    let prompt = |n: u32| -> Vec<u32> { (0..n).map(|i| (i * 37 + 11 + n) % 1000).collect() };
    let (model, mut a, mut b) = int4_kjv_prefilled(&[prompt(250), prompt(9), prompt(253)]);
    let _emu = moe_kernels::emu::enable().unwrap();
    let vec = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let eager = |caches: &mut Vec<moe::model::kv_cache::KvCache>, ids: &[u32]| {
        let mut seqs: Vec<_> = caches
            .iter_mut()
            .zip(ids.chunks(1))
            .map(|(cache, ids)| SeqStep { ids, cache })
            .collect();
        model.forward_batch(&mut seqs, None).unwrap()
    };
    let mut g = GraphDecoder::emulated(&model).unwrap();
    let mut ids = vec![40u32, 41, 42];
    for step in 0..12 {
        let want = vec(eager(&mut a, &ids));
        let got = vec(g.step_batch(&model, &mut b, &ids).unwrap());
        assert_eq!(got, want, "step {step}");
        assert!(a.iter().zip(&b).all(|(x, y)| x.len() == y.len()));
        ids = ids.iter().map(|t| (t * 7 + 3) % 1000).collect();
    }
    assert!(g.active());
    assert_eq!(g.replays, 8);
    // The pass the graphs capture, recorded at two consecutive steps (no bound changes: the first
    // cache is past 256 keys by now).
    let mut recs = Vec::new();
    for t in [5u32, 6] {
        for c in b.iter_mut() {
            assert!(model.write_step_table(c).unwrap());
        }
        let ids = Tensor::new(&[t, t + 1, t + 2], &Device::Cpu).unwrap();
        let mut refs: Vec<_> = b.iter_mut().collect();
        recs.push(record(|| model.decode_batch_in_place(&ids, &mut refs).unwrap()).1);
        b.iter_mut().for_each(|c| c.advance(1));
    }
    assert!(!recs[0].is_empty());
    assert_eq!(recs[1], recs[0]);
}
