//! MoE stage 2, dispatch: group the S = N*K (token, choice) slots by expert, each expert's rows padded to a
//! multiple of a block size.
//!
//! Legend: N tokens, K top-k, S = N*K slots, E experts, B block (padding) size, R = S + E*(B-1) rows.
//!
//! ```text
//! ids       [S] or [N, K]  u32 expert of slot s = n*K + j
//! counts    [E]            u32 slots routed to each expert
//! offsets   [E+1]          u32 expert e owns rows offsets[e] .. offsets[e] + counts[e];
//!                          offsets[e+1] - offsets[e] = counts[e] rounded up to a multiple of B
//! row_token [R]            u32 token of each row; padding rows and rows >= offsets[E] hold PAD_ROW
//! slot_row  [S]            u32 row of each slot
//! ```
//! R is the worst case, so no output size depends on the data and a decode step needs no host sync.
//! With B = 1 this is exactly the engine's `dispatch` (`engine/src/model/moe/dispatch.rs`), whose
//! rows are `row_token[..S]`.
//!
//! [`dispatch_reference`] (a stable counting sort: within an expert, slots keep token order) is the
//! specification. The CUDA kernel (`cuda/moe_dispatch.cu`, NOT YET RUN ON A GPU) ranks slots with shared-memory
//! atomics, so the order of rows within an expert may differ; [`check_dispatch`] states what must hold for any
//! valid dispatch and is what the self-test applies to device results (plus exact counts and offsets).

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::common::{check_dtype, host};
use crate::launch::{Arg, Buf, Plan};

const OP: &str = "moe_dispatch";

/// `row_token` of a padding row.
pub const PAD_ROW: u32 = u32::MAX;
/// The CUDA kernel keeps the counts in shared memory: E <= this.
pub const DISPATCH_MAX_EXPERTS: usize = 1024;

/// A dispatch on the host (the reference's output, or a device result copied back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchHost {
    pub counts: Vec<u32>,
    pub offsets: Vec<u32>,
    pub row_token: Vec<u32>,
    pub slot_row: Vec<u32>,
}

/// A dispatch on the device of its ids (see the module docs for shapes).
#[derive(Debug, Clone)]
pub struct Dispatched {
    pub counts: Tensor,
    pub offsets: Tensor,
    pub row_token: Tensor,
    pub slot_row: Tensor,
}

impl Dispatched {
    pub fn to_host(&self) -> Result<DispatchHost> {
        Ok(DispatchHost {
            counts: host(&self.counts)?,
            offsets: host(&self.offsets)?,
            row_token: host(&self.row_token)?,
            slot_row: host(&self.slot_row)?,
        })
    }
}

/// Rows of a dispatch of `slots` slots over `num_experts` experts padded to `block`: S + E*(B-1).
pub fn dispatch_rows(slots: usize, num_experts: usize, block: usize) -> usize {
    slots + num_experts * (block.max(1) - 1)
}

/// Dispatches `ids` (u32 `[S]` or `[N, K]`, token-major). `block` >= 1 pads each expert's rows.
pub fn moe_dispatch(
    ids: &Tensor,
    top_k: usize,
    num_experts: usize,
    block: usize,
) -> Result<Dispatched> {
    check_dtype(OP, "ids", ids, DType::U32)?;
    let s = ids.elem_count();
    if top_k == 0 || !s.is_multiple_of(top_k) || num_experts == 0 || block == 0 {
        bail!("{OP}: need top_k >= 1 dividing the {s} ids, num_experts >= 1 and block >= 1 (top_k {top_k}, E {num_experts}, block {block})");
    }
    let r = dispatch_rows(s, num_experts, block);
    if r > u32::MAX as usize {
        bail!("{OP}: {r} rows exceed u32");
    }
    if crate::launch::runs_kernels(ids.device()) {
        return run_plan(ids, top_k, num_experts, block, s);
    }
    match ids.device() {
        Device::Cpu => {
            let d = dispatch_reference(&host::<u32>(ids)?, top_k, num_experts, block)?;
            let dev = Device::Cpu;
            Ok(Dispatched {
                counts: Tensor::from_vec(d.counts, num_experts, &dev)?,
                offsets: Tensor::from_vec(d.offsets, num_experts + 1, &dev)?,
                row_token: Tensor::from_vec(d.row_token, r, &dev)?,
                slot_row: Tensor::from_vec(d.slot_row, s, &dev)?,
            })
        }
        d => bail!("{OP}: unsupported device {:?}", d.location()),
    }
}

/// The specification: a stable counting sort with padded groups. Ids >= E are an error.
pub fn dispatch_reference(
    ids: &[u32],
    top_k: usize,
    num_experts: usize,
    block: usize,
) -> Result<DispatchHost> {
    let block = block.max(1) as u32;
    let mut counts = vec![0u32; num_experts];
    for (i, &e) in ids.iter().enumerate() {
        if e as usize >= num_experts {
            bail!("{OP}: ids[{i}] = {e} is not an expert (E = {num_experts})");
        }
        counts[e as usize] += 1;
    }
    let mut offsets = Vec::with_capacity(num_experts + 1);
    offsets.push(0u32);
    for &c in &counts {
        offsets.push(offsets.last().unwrap() + c.div_ceil(block) * block);
    }
    let mut next: Vec<u32> = offsets[..num_experts].to_vec();
    let mut row_token = vec![PAD_ROW; dispatch_rows(ids.len(), num_experts, block as usize)];
    let mut slot_row = vec![0u32; ids.len()];
    for (slot, &e) in ids.iter().enumerate() {
        let row = next[e as usize];
        next[e as usize] += 1;
        row_token[row as usize] = (slot / top_k) as u32;
        slot_row[slot] = row;
    }
    Ok(DispatchHost {
        counts,
        offsets,
        row_token,
        slot_row,
    })
}

/// Whether `d` is a valid dispatch of `ids`, whatever the order of rows within an expert: counts and offsets
/// equal the reference's; every slot's row lies in its expert's live range and holds its token; slot rows are
/// distinct; every other row is PAD_ROW. The message names the first violation.
pub fn check_dispatch(
    ids: &[u32],
    top_k: usize,
    num_experts: usize,
    block: usize,
    d: &DispatchHost,
) -> std::result::Result<(), String> {
    let want = dispatch_reference(ids, top_k, num_experts, block).map_err(|e| e.to_string())?;
    if d.counts != want.counts {
        return Err(format!(
            "counts differ: got {:?}, want {:?}",
            d.counts, want.counts
        ));
    }
    if d.offsets != want.offsets {
        return Err(format!(
            "offsets differ: got {:?}, want {:?}",
            d.offsets, want.offsets
        ));
    }
    if d.row_token.len() != want.row_token.len() || d.slot_row.len() != ids.len() {
        return Err(format!(
            "lengths: row_token {} (want {}), slot_row {} (want {})",
            d.row_token.len(),
            want.row_token.len(),
            d.slot_row.len(),
            ids.len()
        ));
    }
    let mut used = vec![false; d.row_token.len()];
    for (s, (&e, &row)) in ids.iter().zip(&d.slot_row).enumerate() {
        let (lo, cnt) = (d.offsets[e as usize], d.counts[e as usize]);
        if row < lo || row >= lo + cnt {
            return Err(format!(
                "slot {s} (expert {e}) has row {row}, outside {lo}..{}",
                lo + cnt
            ));
        }
        if std::mem::replace(&mut used[row as usize], true) {
            return Err(format!("row {row} is used by two slots"));
        }
        if d.row_token[row as usize] != (s / top_k) as u32 {
            return Err(format!(
                "row {row} of slot {s} holds token {}, want {}",
                d.row_token[row as usize],
                s / top_k
            ));
        }
    }
    if let Some((r, &t)) = d
        .row_token
        .iter()
        .enumerate()
        .find(|&(r, &t)| !used[r] && t != PAD_ROW)
    {
        return Err(format!("padding row {r} holds {t}, want PAD_ROW"));
    }
    Ok(())
}

/// The launch of `moe_dispatch` on `S` ids over `E` experts padded to `block`: one block (its stride loops
/// cover any sizes) of `max(S, R, E + 1)` threads rounded up to a warp, at most 1024 (`__launch_bounds__`).
/// Input `ids`; outputs `counts [E]`, `offsets [E+1]`, `row_token [R]`, `slot_row [S]` (all u32). An error
/// where E exceeds the kernel's shared-memory table or a size exceeds u32.
pub fn dispatch_plan(s: usize, top_k: usize, e: usize, block: usize) -> Result<Plan> {
    if e > DISPATCH_MAX_EXPERTS {
        bail!("{OP}: the CUDA kernel supports E <= {DISPATCH_MAX_EXPERTS}, got {e}");
    }
    let r = dispatch_rows(s, e, block);
    let u = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!("{OP}: {what} = {v} exceeds the kernel's u32"))
        })
    };
    let sizes = [
        u(s, "S")?,
        u(top_k, "top_k")?,
        u(e, "E")?,
        u(block, "block")?,
        u(r, "R")?,
    ];
    let mut p = Plan::new(OP, &["ids"]);
    let counts = p.out("counts", DType::U32, e);
    let offsets = p.out("offsets", DType::U32, e + 1);
    let row_token = p.out("row_token", DType::U32, r);
    let slot_row = p.out("slot_row", DType::U32, s);
    let threads = s.max(r).max(e + 1).next_multiple_of(32).min(1024) as u32;
    let mut args = vec![Arg::Buf(Buf::In(0)), counts, offsets, row_token, slot_row];
    args.extend(sizes.map(Arg::U32));
    // SAFETY (of the executor's launch): argument order and types match `moe_dispatch`; it writes E counts,
    // E+1 offsets, R row_token and S slot_row entries (one block, stride loops) and reads S ids.
    p.launch(
        "moe_dispatch",
        "moe_dispatch".to_string(),
        [1, 1, 1],
        [threads, 1, 1],
        args,
    );
    Ok(p)
}

fn run_plan(ids: &Tensor, top_k: usize, e: usize, block: usize, s: usize) -> Result<Dispatched> {
    let plan = dispatch_plan(s, top_k, e, block)?;
    let outs = plan.run(&[ids])?;
    let Ok([counts, offsets, row_token, slot_row]) = <[Tensor; 4]>::try_from(outs) else {
        bail!("{OP}: the plan returned the wrong number of outputs")
    };
    Ok(Dispatched {
        counts,
        offsets,
        row_token,
        slot_row,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_semantics_and_padding() {
        // The engine's dispatch.rs case: 3 tokens, top-2, 4 experts, expert 3 idle.
        let ids = [1, 0, 0, 2, 1, 2];
        let d = dispatch_reference(&ids, 2, 4, 1).unwrap();
        assert_eq!(d.counts, vec![2, 2, 2, 0]);
        assert_eq!(d.offsets, vec![0, 2, 4, 6, 6]);
        assert_eq!(d.row_token, vec![0, 1, 0, 2, 1, 2]);
        assert_eq!(check_dispatch(&ids, 2, 4, 1, &d), Ok(()));
        let p = dispatch_reference(&ids, 2, 4, 4).unwrap();
        assert_eq!(p.offsets, vec![0, 4, 8, 12, 12]);
        assert_eq!(p.row_token.len(), 6 + 4 * 3);
        assert_eq!(&p.row_token[..6], &[0, 1, PAD_ROW, PAD_ROW, 0, 2]);
        assert_eq!(check_dispatch(&ids, 2, 4, 4, &p), Ok(()));
        // A reordering within an expert is still valid; a wrong token is not.
        let mut q = d.clone();
        q.row_token.swap(0, 1); // expert 0: slot 1 (token 0) and slot 2 (token 1) trade rows 0 and 1
        q.slot_row.swap(1, 2);
        assert_eq!(check_dispatch(&ids, 2, 4, 1, &q), Ok(()));
        let mut bad = d.clone();
        bad.row_token[0] = 2;
        assert!(check_dispatch(&ids, 2, 4, 1, &bad).is_err());
        assert!(dispatch_reference(&[4], 1, 4, 1).is_err());
    }

    #[test]
    fn plan_geometry() {
        let src = include_str!("../cuda/moe_dispatch.cu");
        assert!(src.contains(&format!("#define DISPATCH_MAX_E {DISPATCH_MAX_EXPERTS}\n")));
        assert!(src.contains("__launch_bounds__(1024)"));
        let shape = |p: &Plan| {
            p.outs
                .iter()
                .map(|a| (a.name, a.shape.dims().to_vec()))
                .collect::<Vec<_>>()
        };
        // Decode, top-8 over 256 experts: E + 1 = 257 threads rounded up to a warp.
        let p = dispatch_plan(8, 8, 256, 1).unwrap();
        assert_eq!(p.inputs, vec!["ids"]);
        assert_eq!(
            shape(&p),
            vec![
                ("counts", vec![256]),
                ("offsets", vec![257]),
                ("row_token", vec![8]),
                ("slot_row", vec![8])
            ]
        );
        let l = &p.launches[0];
        assert_eq!(
            (l.module, l.entry.as_str()),
            ("moe_dispatch", "moe_dispatch")
        );
        assert_eq!((l.grid, l.block), ([1, 1, 1], [288, 1, 1]));
        assert_eq!(
            l.args,
            vec![
                Arg::Buf(Buf::In(0)),
                Arg::Buf(Buf::Out(0)),
                Arg::Buf(Buf::Out(1)),
                Arg::Buf(Buf::Out(2)),
                Arg::Buf(Buf::Out(3)),
                Arg::U32(8),
                Arg::U32(8),
                Arg::U32(256),
                Arg::U32(1),
                Arg::U32(8)
            ]
        );
        // Padding: R = 7*2 + 3*15 = 59 rows -> 64 threads; a prefill past 1024 slots keeps 1024 threads.
        let p = dispatch_plan(14, 2, 3, 16).unwrap();
        assert_eq!(p.outs[2].shape.dims(), &[59]);
        assert_eq!(p.launches[0].block, [64, 1, 1]);
        assert_eq!(p.launches[0].args[9], Arg::U32(59));
        assert_eq!(
            dispatch_plan(4104, 8, 64, 1).unwrap().launches[0].block,
            [1024, 1, 1]
        );
        // No slots still launches (counts and offsets are written) with a warp.
        let p = dispatch_plan(0, 2, 4, 1).unwrap();
        assert_eq!((p.launches.len(), p.launches[0].block), (1, [32, 1, 1]));
        assert!(dispatch_plan(8, 8, DISPATCH_MAX_EXPERTS + 1, 1).is_err());
    }

    #[test]
    fn op_on_cpu() {
        let ids = Tensor::new(&[[3u32, 1], [1, 0]], &Device::Cpu).unwrap();
        let d = moe_dispatch(&ids, 2, 4, 1).unwrap().to_host().unwrap();
        assert_eq!(d.counts, vec![1, 2, 0, 1]);
        assert_eq!(d.slot_row, vec![3, 1, 2, 0]);
    }
}
