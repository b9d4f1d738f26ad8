//! Stage 4, combine: each token's output is the routing-weighted sum of its A expert rows,
//! `out[n] = sum_j w[n, j] * y[slot_row[n*A + j]]`, accumulated in f32 (as transformers does:
//! its f32 routing weights promote the product) and stored in the activation dtype.

use candle_core::{Result, Tensor};

use super::{Dispatch, Routing};

/// `y [N*A, H]` expert-sorted rows -> `[N, H]`, through the `moe_combine` op of `moe-kernels`
/// (its plain-Rust reference on the CPU, its CUDA kernel on a GPU).
pub fn combine(y: &Tensor, d: &Dispatch, routing: &Routing) -> Result<Tensor> {
    let a = d.top_k;
    let n = d.slot_row.len() / a.max(1);
    let device = y.device();
    let slot_row = Tensor::from_slice(&d.slot_row, (n, a), device)?;
    let w = Tensor::from_slice(&routing.weights, (n, a), device)?;
    moe_kernels::moe_combine(y, &slot_row, &w)
}

#[cfg(test)]
mod tests {
    use super::super::dispatch;
    use super::*;
    use candle_core::Device;

    #[test]
    fn weighted_sum_per_token() {
        let dev = Device::Cpu;
        // 2 tokens, top-2 over 3 experts: token 0 -> experts (2, 0), token 1 -> (0, 1).
        let routing = Routing {
            top_k: 2,
            ids: vec![2, 0, 0, 1],
            weights: vec![0.75, 0.25, 0.5, 0.5],
        };
        let d = dispatch(&routing.ids, 2, 3).unwrap();
        // Sorted rows: e0: (tok0, tok1), e1: (tok1), e2: (tok0). Row r holds value r+1.
        let y = Tensor::new(&[[1f32, 10.], [2., 20.], [3., 30.], [4., 40.]], &dev).unwrap();
        let out: Vec<Vec<f32>> = combine(&y, &d, &routing).unwrap().to_vec2().unwrap();
        assert_eq!(out[0], vec![0.75 * 4. + 0.25 * 1., 0.75 * 40. + 0.25 * 10.]);
        assert_eq!(out[1], vec![0.5 * 2. + 0.5 * 3., 0.5 * 20. + 0.5 * 30.]);
    }
}
