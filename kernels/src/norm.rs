//! RMSNorm, optionally fused with the residual add in front of it.
//!
//! Legend: T tokens, H hidden.
//!
//! ```text
//! x, residual [T, H]  f32 | bf16 | f16 (same dtype; residual optional)
//! weight      [H]     same dtype
//! h   = residual ? T(x + residual) : x          (returned by add_rms_norm: the next residual)
//! out = T(f32(T(h / sqrt(mean(h^2) + eps))) * f32(weight))
//! ```
//! the roundings of the engine's `Norm` (`engine/src/model/norm.rs`: statistics in f32, the normalised value
//! cast to the activation dtype, then scaled by the weight in that dtype). [`rms_norm_reference`] is the
//! specification; the CUDA kernel is `cuda/rms_norm.cu` (NOT YET RUN ON A GPU).

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::common::{check_act, host, same_device, Elem};

const OP: &str = "rms_norm";

/// Self-test budgets: the kernel's sum of squares is a tree, so f32 moves by ~1e-7 relative and bf16/f16
/// outputs by at most an ulp where the rounding flips.
pub const RMS_NORM_NMSE_F32: f64 = 1e-11;
pub const RMS_NORM_NMSE_F16: f64 = 1e-7;
pub const RMS_NORM_NMSE_BF16: f64 = 1e-5;

/// `out = rms_norm(x) * weight` over the last dimension of `x [T, H]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(norm(x, None, weight, eps)?.1)
}

/// `h = x + residual; (h, rms_norm(h) * weight)`: the fused pre-norm of a decoder layer.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (h, out) = norm(x, Some(residual), weight, eps)?;
    Ok((h.expect("fused norm returns h"), out))
}

fn norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
) -> Result<(Option<Tensor>, Tensor)> {
    check_act(OP, "x", x.dtype())?;
    let (t, h) = x.dims2()?;
    if weight.dims() != [h] || weight.dtype() != x.dtype() {
        bail!(
            "{OP}: weight must be [{h}] {:?}, got {:?} {:?}",
            x.dtype(),
            weight.dims(),
            weight.dtype()
        );
    }
    same_device(OP, &[("x", x), ("weight", weight)])?;
    if let Some(r) = residual {
        if r.dims() != x.dims() || r.dtype() != x.dtype() {
            bail!(
                "{OP}: residual must be {:?} {:?}, got {:?} {:?}",
                x.dims(),
                x.dtype(),
                r.dims(),
                r.dtype()
            );
        }
        same_device(OP, &[("x", x), ("residual", r)])?;
    }
    match x.device() {
        Device::Cpu => {
            fn run<T: Elem>(
                x: &Tensor,
                r: Option<&Tensor>,
                w: &Tensor,
                eps: f32,
                t: usize,
                h: usize,
            ) -> Result<(Option<Tensor>, Tensor)> {
                let r = r.map(host::<T>).transpose()?;
                let (hv, out) = rms_norm_reference::<T>(&host(x)?, r.as_deref(), &host(w)?, h, eps);
                let dev = Device::Cpu;
                Ok((
                    hv.map(|v| Tensor::from_vec(v, (t, h), &dev)).transpose()?,
                    Tensor::from_vec(out, (t, h), &dev)?,
                ))
            }
            match x.dtype() {
                DType::F32 => run::<f32>(x, residual, weight, eps, t, h),
                DType::BF16 => run::<half::bf16>(x, residual, weight, eps, t, h),
                _ => run::<half::f16>(x, residual, weight, eps, t, h),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda_norm(x, residual, weight, eps, t, h),
        d => bail!("{OP}: unsupported device {:?}", d.location()),
    }
}

/// The specification: `x` (and `residual`) `[T*H]`, `weight [H]`; returns `(h if fused, out)`.
pub fn rms_norm_reference<T: Elem>(
    x: &[T],
    residual: Option<&[T]>,
    weight: &[T],
    h: usize,
    eps: f32,
) -> (Option<Vec<T>>, Vec<T>) {
    let hv: Option<Vec<T>> = residual.map(|r| {
        x.iter()
            .zip(r)
            .map(|(&a, &b)| T::of(a.f32() + b.f32()))
            .collect()
    });
    let src = hv.as_deref().unwrap_or(x);
    let mut out = Vec::with_capacity(src.len());
    for row in src.chunks_exact(h.max(1)) {
        let ss: f32 = row.iter().map(|v| v.f32() * v.f32()).sum();
        let denom = (ss / h as f32 + eps).sqrt();
        out.extend(
            row.iter()
                .zip(weight)
                .map(|(&v, &w)| T::of(T::of(v.f32() / denom).f32() * w.f32())),
        );
    }
    (hv, out)
}

#[cfg(feature = "cuda")]
fn cuda_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
    t: usize,
    h: usize,
) -> Result<(Option<Tensor>, Tensor)> {
    use crate::common::cuda::{alloc_out, wrap};
    use crate::common::cuda_act::ActView;
    use crate::cuda_util::module_key;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::Storage;

    let x = x.contiguous()?;
    let w = weight.contiguous()?;
    let r = residual.map(|r| r.contiguous()).transpose()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let rg = r.as_ref().map(|r| r.storage_and_layout());
    let (Storage::Cuda(xc), Storage::Cuda(wc)) = (&*xs, &*ws) else {
        bail!("{OP}: inputs are not on a CUDA device")
    };
    let dev = xc.device.clone();
    let xv = ActView::new(xc, xl, OP, "x")?;
    let wv = ActView::new(wc, wl, OP, "weight")?;
    let rv = match &rg {
        Some((rs, rl)) => {
            let Storage::Cuda(rc) = &**rs else {
                bail!("{OP}: residual is not on a CUDA device")
            };
            Some(ActView::new(rc, rl, OP, "residual")?)
        }
        None => None,
    };
    let m = &crate::ptx::RMS_NORM;
    let func =
        dev.get_or_load_custom_func(&format!("rms_norm_{}", xv.suffix()), &module_key(m), m.ptx)?;
    let cfg = LaunchConfig {
        grid_dim: (t as u32, 1, 1),
        block_dim: (256, 1, 1), // NORM_THREADS in rms_norm.cu
        shared_mem_bytes: 0,
    };
    let fused = rv.is_some();
    let null = 0usize;
    macro_rules! run_dtype {
        ($ty:ty, $variant:ident) => {{
            let hout = alloc_out::<$ty>(&dev, if fused { t * h } else { 1 })?;
            let out = alloc_out::<$ty>(&dev, t * h)?;
            if t > 0 && h > 0 {
                let mut b = func.builder();
                xv.push(&mut b);
                match &rv {
                    Some(v) => v.push(&mut b),
                    None => {
                        b.arg(&null);
                    }
                }
                wv.push(&mut b);
                b.arg(&hout);
                b.arg(&out);
                candle_core::builder_arg!(b, h as u32, eps);
                // SAFETY: matches rms_norm_<dtype>: one block per row reads x (and residual) [T,H], weight [H],
                // writes out [T,H] and, when residual is not null, h_out [T,H].
                unsafe { b.launch(cfg) }.w()?;
            }
            let hv = fused.then(|| wrap(CudaStorageSlice::$variant(hout), &dev, (t, h)));
            Ok((hv, wrap(CudaStorageSlice::$variant(out), &dev, (t, h))))
        }};
    }
    match xv {
        ActView::F32(_) => run_dtype!(f32, F32),
        ActView::BF16(_) => run_dtype!(half::bf16, BF16),
        ActView::F16(_) => run_dtype!(half::f16, F16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_engine_formula() {
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.0, -1.0, 0.5]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1.0f32, 0.5, 2.0], &Device::Cpu).unwrap();
        let got: Vec<Vec<f32>> = rms_norm(&x, &w, 1e-6).unwrap().to_vec2().unwrap();
        let r = ((1.0f32 + 4.0 + 9.0) / 3.0 + 1e-6).sqrt();
        assert!((got[0][2] - 2.0 * 3.0 / r).abs() < 1e-6);
        let (hsum, out) = add_rms_norm(&x, &x, &w, 1e-6).unwrap();
        assert_eq!(hsum.to_vec2::<f32>().unwrap()[0], vec![2.0, 4.0, 6.0]);
        let same = rms_norm(&(&x * 2.0).unwrap(), &w, 1e-6).unwrap();
        assert_eq!(
            out.to_vec2::<f32>().unwrap(),
            same.to_vec2::<f32>().unwrap()
        );
    }
}
