//! One decode step of grouped-query attention over a preallocated KV cache (flash-decoding).
//!
//! Legend: B batch, H query heads, KV kv heads (H % KV == 0, g = H / KV), CAP cache capacity, L valid length,
//! D head dim.
//!
//! ```text
//! q        [B, H, 1, D]      f32 | bf16 | f16
//! k, v     [B, KV, CAP, D]   same dtype; rows >= L (and, with a window, rows < start) are never read
//! start    = window ? L - min(w, L) : 0      (the query sits at position L - 1 and sees key j iff
//!                                             j <= L - 1 and L - 1 - j < w: the engine's mask rule)
//! s_j      = scale * sum_d f32(q[d]) * f32(k[j, d])    j in start..L, kv head h / g
//! out      [B, H, 1, D] = T(sum_j exp(s_j - max s) * f32(v[j]) / sum_j exp(s_j - max s))
//! ```
//! Softmax and the weighted sum stay in f32 (the engine rounds the probabilities to the activation dtype
//! before its matmul; this op does not). [`decode_attention_reference`] is the specification.
//!
//! The CUDA path (`cuda/decode_attention.cu`, written and compiled without a GPU, NOT YET RUN ON ONE) splits
//! `start..L` into chunks of [`DECODE_ATTN_CHUNK`] keys: one block per (chunk, head, batch) writes the chunk's
//! max, exp-sum and unnormalised f32 output, then a reduce kernel rescales and combines the chunks per head.

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::common::{check_act, host, same_device, Elem};

const OP: &str = "decode_attention";

/// Keys per block of the CUDA chunk kernel (`DA_CHUNK` in `cuda/decode_attention.cu`).
pub const DECODE_ATTN_CHUNK: usize = 256;
/// Largest head dim the CUDA kernel stages in shared memory (`DA_MAX_D`).
pub const DECODE_ATTN_MAX_D: usize = 512;

/// Self-test budgets (not yet measured on a GPU): f32 differs by summation order and expf; bf16/f16 outputs
/// by an ulp where the single final rounding flips.
pub const DECODE_ATTN_NMSE_F32: f64 = 1e-10;
pub const DECODE_ATTN_NMSE_F16: f64 = 1e-6;
pub const DECODE_ATTN_NMSE_BF16: f64 = 1e-5;

/// First visible key of a query at position `len - 1` with an optional sliding window.
pub fn window_start(len: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| len.saturating_sub(w))
}

/// `softmax(q K[start..L]^T * scale) V[start..L]` for one new token per sequence: q `[B, H, 1, D]`, caches
/// `[B, KV, CAP, D]` -> `[B, H, 1, D]`.
pub fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    check_act(OP, "q", q.dtype())?;
    let (b, h, one, d) = q.dims4()?;
    let (kb, kv, cap, kd) = k_cache.dims4()?;
    if one != 1 || kb != b || kd != d || kv == 0 || h % kv != 0 {
        bail!(
            "{OP}: q [B, H, 1, D] and k_cache [B, KV, CAP, D] with H % KV == 0, got {:?} and {:?}",
            q.dims(),
            k_cache.dims()
        );
    }
    if v_cache.dims() != k_cache.dims() {
        bail!(
            "{OP}: v_cache must be {:?}, got {:?}",
            k_cache.dims(),
            v_cache.dims()
        );
    }
    for (n, c) in [("k_cache", k_cache), ("v_cache", v_cache)] {
        if c.dtype() != q.dtype() {
            bail!("{OP}: {n} must be {:?}, got {:?}", q.dtype(), c.dtype());
        }
    }
    if len == 0 || len > cap || window == Some(0) {
        bail!("{OP}: need 1 <= len <= cap ({cap}) and a window >= 1, got len {len}, window {window:?}");
    }
    same_device(OP, &[("q", q), ("k_cache", k_cache), ("v_cache", v_cache)])?;
    let dims = (b, h, kv, cap, d);
    match q.device() {
        Device::Cpu => {
            fn run<T: Elem>(
                q: &Tensor,
                k: &Tensor,
                v: &Tensor,
                dims: (usize, usize, usize, usize, usize),
                len: usize,
                window: Option<usize>,
                scale: f32,
            ) -> Result<Tensor> {
                let out = decode_attention_reference::<T>(
                    &host(q)?,
                    &host(k)?,
                    &host(v)?,
                    dims,
                    len,
                    window,
                    scale,
                );
                Tensor::from_vec(out, (dims.0, dims.1, 1, dims.4), &Device::Cpu)
            }
            match q.dtype() {
                DType::F32 => run::<f32>(q, k_cache, v_cache, dims, len, window, scale),
                DType::BF16 => run::<half::bf16>(q, k_cache, v_cache, dims, len, window, scale),
                _ => run::<half::f16>(q, k_cache, v_cache, dims, len, window, scale),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda_decode_attention(q, k_cache, v_cache, dims, len, window, scale),
        dev => bail!("{OP}: unsupported device {:?}", dev.location()),
    }
}

/// The specification. `q [B*H*D]`, `k`, `v [B*KV*CAP*D]`, `dims = (B, H, KV, CAP, D)`; returns `[B*H*D]`.
/// Reads only rows `window_start(len, window)..len` of the caches.
pub fn decode_attention_reference<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: (usize, usize, usize, usize, usize),
    len: usize,
    window: Option<usize>,
    scale: f32,
) -> Vec<T> {
    let (b, h, kv, cap, d) = dims;
    let g = h / kv;
    let start = window_start(len, window);
    let mut out = Vec::with_capacity(b * h * d);
    let mut s = vec![0f32; len - start];
    let mut acc = vec![0f32; d];
    for bi in 0..b {
        for hi in 0..h {
            let qr = &q[(bi * h + hi) * d..][..d];
            let base = (bi * kv + hi / g) * cap;
            for (j, sj) in (start..len).zip(s.iter_mut()) {
                let kr = &k[(base + j) * d..][..d];
                *sj = scale
                    * qr.iter()
                        .zip(kr)
                        .map(|(a, b)| a.f32() * b.f32())
                        .sum::<f32>();
            }
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            acc.iter_mut().for_each(|a| *a = 0.0);
            let mut total = 0f32;
            for (j, &sj) in (start..len).zip(&s) {
                let p = (sj - m).exp();
                total += p;
                let vr = &v[(base + j) * d..][..d];
                acc.iter_mut().zip(vr).for_each(|(a, x)| *a += p * x.f32());
            }
            out.extend(acc.iter().map(|a| T::of(a / total)));
        }
    }
    out
}

#[cfg(feature = "cuda")]
fn cuda_decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: (usize, usize, usize, usize, usize),
    len: usize,
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    use crate::common::cuda::{alloc_out, wrap};
    use crate::common::cuda_act::ActView;
    use crate::cuda_util::module_key;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::Storage;

    let (b, h, kv, cap, d) = dims;
    if d > DECODE_ATTN_MAX_D {
        bail!("{OP}: the CUDA kernel takes head dims up to {DECODE_ATTN_MAX_D}, got {d}");
    }
    if b > 65535 || h > 65535 {
        bail!("{OP}: the CUDA grid takes B, H <= 65535, got B = {b}, H = {h}");
    }
    let start = window_start(len, window);
    let chunks = (len - start).div_ceil(DECODE_ATTN_CHUNK);
    let q = q.contiguous()?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cuda(qc), Storage::Cuda(kc), Storage::Cuda(vc)) = (&*qs, &*ks, &*vs) else {
        bail!("{OP}: inputs are not on a CUDA device")
    };
    let dev = qc.device.clone();
    let qv = ActView::new(qc, ql, OP, "q")?;
    let kvw = ActView::new(kc, kl, OP, "k_cache")?;
    let vv = ActView::new(vc, vl, OP, "v_cache")?;
    let m = &crate::ptx::DECODE_ATTENTION;
    let sfx = qv.suffix();
    let chunk_fn = dev.get_or_load_custom_func(
        &format!("decode_attention_chunk_{sfx}"),
        &module_key(m),
        m.ptx,
    )?;
    let reduce_fn = dev.get_or_load_custom_func(
        &format!("decode_attention_reduce_{sfx}"),
        &module_key(m),
        m.ptx,
    )?;
    // Partials: max and exp-sum [B, H, chunks], unnormalised output [B, H, chunks, D], all f32.
    let part_m = alloc_out::<f32>(&dev, b * h * chunks)?;
    let part_s = alloc_out::<f32>(&dev, b * h * chunks)?;
    let part_o = alloc_out::<f32>(&dev, b * h * chunks * d)?;
    const THREADS: u32 = 128; // DA_THREADS in decode_attention.cu
    let (b32, h32, kv32, cap32, d32) = (b as u32, h as u32, kv as u32, cap as u32, d as u32);
    let (start32, len32, chunks32) = (start as u32, len as u32, chunks as u32);
    macro_rules! run_dtype {
        ($ty:ty, $variant:ident) => {{
            let out = alloc_out::<$ty>(&dev, b * h * d)?;
            if b * h * d > 0 {
                let mut lb = chunk_fn.builder();
                qv.push(&mut lb);
                kvw.push(&mut lb);
                vv.push(&mut lb);
                lb.arg(&part_m);
                lb.arg(&part_s);
                lb.arg(&part_o);
                candle_core::builder_arg!(lb, h32, kv32, cap32, d32, start32, len32, chunks32, scale);
                let cfg = LaunchConfig {
                    grid_dim: (chunks32, h32, b32),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: matches decode_attention_chunk_<dtype>: block (c, h, b) reads q [B,H,D] and cache
                // rows start + c*CHUNK .. min(len, start + (c+1)*CHUNK) of kv head h / (H/KV), writes
                // part_m/part_s [B,H,chunks] and part_o [B,H,chunks,D] at (b, h, c).
                unsafe { lb.launch(cfg) }.w()?;
                let mut rb = reduce_fn.builder();
                rb.arg(&part_m);
                rb.arg(&part_s);
                rb.arg(&part_o);
                rb.arg(&out);
                candle_core::builder_arg!(rb, h32, d32, chunks32);
                let cfg = LaunchConfig {
                    grid_dim: (h32, b32, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: matches decode_attention_reduce_<dtype>: block (h, b) reads the chunk partials of
                // (b, h) written above on the same stream and writes out [B,H,D] at (b, h).
                unsafe { rb.launch(cfg) }.w()?;
            }
            Ok(wrap(CudaStorageSlice::$variant(out), &dev, (b, h, 1, d)))
        }};
    }
    match qv {
        ActView::F32(_) => run_dtype!(f32, F32),
        ActView::BF16(_) => run_dtype!(half::bf16, BF16),
        ActView::F16(_) => run_dtype!(half::f16, F16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_matches_the_cuda_source() {
        // No GPU here: at least keep the launcher's constants and entry names in step with the kernel.
        let src = include_str!("../cuda/decode_attention.cu");
        assert!(src.contains(&format!("#define DA_CHUNK {DECODE_ATTN_CHUNK}\n")));
        assert!(src.contains(&format!("#define DA_MAX_D {DECODE_ATTN_MAX_D}\n")));
        assert!(src.contains("#define DA_THREADS 128\n")); // THREADS in cuda_decode_attention
        for dt in ["f32", "bf16", "f16"] {
            assert!(src.contains(&format!("DA_ENTRY({dt},")));
        }
        assert!(src.contains("decode_attention_chunk_##SUFFIX("));
        assert!(src.contains("decode_attention_reduce_##SUFFIX("));
    }

    #[test]
    fn one_key_returns_its_value_and_window_hides_old_keys() {
        // B=1, H=2, KV=1, CAP=4, D=2; L=3, window 1 -> only key 2 is visible.
        let q = Tensor::new(&[1.0f32, 0.0, 0.0, 1.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 2))
            .unwrap();
        let k = Tensor::new(
            &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, f32::NAN, f32::NAN],
            &Device::Cpu,
        )
        .unwrap()
        .reshape((1, 1, 4, 2))
        .unwrap();
        let v = (&k * 10.0).unwrap();
        let out: Vec<f32> = decode_attention(&q, &k, &v, 3, Some(1), 0.5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out, vec![50.0, 60.0, 50.0, 60.0]);
        // No window: head 0 scores 0.5*[1, 3, 5].
        let out: Vec<f32> = decode_attention(&q, &k, &v, 3, None, 0.5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let e: Vec<f32> = [0.5f32, 1.5, 2.5].iter().map(|s| (s - 2.5).exp()).collect();
        let tot: f32 = e.iter().sum();
        let want0 = (e[0] * 10.0 + e[1] * 30.0 + e[2] * 50.0) / tot;
        assert!((out[0] - want0).abs() < 1e-4, "{} vs {want0}", out[0]);
        assert!(decode_attention(&q, &k, &v, 5, None, 0.5).is_err());
    }
}
