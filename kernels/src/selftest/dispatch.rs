//! Self-test cases: Dispatch: counts and offsets exactly, rows checked as a valid dispatch (their order is free).

use super::*;
use crate::dispatch::{check_dispatch, moe_dispatch};

pub(super) fn dispatch_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    // (N, K, E, experts actually used, block): decode, every expert used, idle experts, padding.
    let cases = [
        (1, 8, 256, 256, 1),
        (7, 2, 8, 8, 1),
        (8, 2, 16, 16, 1),
        (64, 8, 256, 256, 1),
        (64, 4, 64, 20, 16),
        (513, 8, 64, 64, 1),
        (513, 4, 16, 11, 64),
    ];
    for &(n, k, e, pool, block) in &cases {
        let case = format!("N={n} k={k} E={e} used<={pool} B={block}");
        let ids = if n * k == e && pool == e {
            (0..(n * k) as u32).map(|i| i % e as u32).collect() // every expert exactly once
        } else {
            rng.ids(n, k, pool)
        };
        let r = (|| {
            let it = Tensor::from_slice(&ids, (n, k), device)?;
            let (d, time_us) = timed(device, || moe_dispatch(&it, k, e, block))?;
            let got = d.to_host()?;
            let note = check_dispatch(&ids, k, e, block, &got)
                .err()
                .unwrap_or_default();
            Ok(Row {
                op: "dispatch",
                case: case.clone(),
                dtype: DType::U32,
                nmse: 0.0,
                budget: 0.0,
                time_us,
                note,
            })
        })();
        rows.push(row_or_error("dispatch", case, DType::U32, 0.0, r));
    }
    Ok(())
}
