//! Pieces shared by the op families added after `combine`: the activation element trait, the dtype and
//! device checks, and (feature `cuda`) the launch helpers and output poisoning used by the self-test.
//!
//! Why these ops are free functions and not `CustomOp`s: candle's custom ops return one tensor and take at
//! most three. `moe_route` returns two, `moe_dispatch` four, `moe_experts` takes six inputs and
//! `add_rms_norm` returns two, so each op takes its inputs' storage directly (`Tensor::storage_and_layout`)
//! and wraps the outputs it allocates with `Tensor::from_storage`. The CPU branch of every op calls the
//! plain-Rust reference (the specification); the CUDA branch launches the kernel on candle's stream.

use candle_core::{bail, DType, Result, Tensor};
use half::{bf16, f16};
use std::sync::atomic::{AtomicBool, Ordering};

/// Activation element: converted to f32 to accumulate, rounded to nearest even on the way back.
pub trait Elem: Copy + Send + Sync + 'static + candle_core::WithDType {
    fn f32(self) -> f32;
    fn of(x: f32) -> Self;
}
impl Elem for f32 {
    fn f32(self) -> f32 {
        self
    }
    fn of(x: f32) -> Self {
        x
    }
}
impl Elem for bf16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
    fn of(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl Elem for f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
    fn of(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Columns of a decode step's table (u32 `[rows, 4]`, one row per layer): the new token's position, the
/// first cached key it attends to, the number of cache rows it reads (`first..keys`) and the cache row its
/// key and value go to.
pub const STEP_POS: usize = 0;
pub const STEP_START: usize = 1;
pub const STEP_KEYS: usize = 2;
pub const STEP_SLOT: usize = 3;
pub const STEP_COLS: usize = 4;

/// Row `row` of a decode step's table (u32 `[rows, STEP_COLS]`, contiguous, on the op's device), which the
/// kernels read as they run. A launch whose per-step numbers come from here is the same launch at every
/// step: a captured CUDA graph replays it while the host rewrites the table in place between steps.
#[derive(Debug, Clone, Copy)]
pub struct StepRow<'a> {
    pub table: &'a Tensor,
    pub row: usize,
}

impl StepRow<'_> {
    /// Checks the table's dtype, shape and row; `op` names the caller in the error.
    pub(crate) fn check(&self, op: &str) -> Result<u32> {
        check_dtype(op, "step table", self.table, DType::U32)?;
        match self.table.dims() {
            [rows, STEP_COLS] if self.row < *rows && self.table.is_contiguous() => {
                u32::try_from(self.row).map_err(|_| {
                    candle_core::Error::Msg(format!("{op}: step row {} exceeds u32", self.row))
                })
            }
            d => bail!(
                "{op}: the step table must be a contiguous u32 [rows, {STEP_COLS}] with row {} in it, got {d:?}",
                self.row
            ),
        }
    }

    /// Column `col` of the row, read to the host (the CPU reference's path).
    pub(crate) fn read(&self, col: usize) -> Result<usize> {
        let v: Vec<u32> = host(&self.table.narrow(0, self.row, 1)?)?;
        Ok(v[col] as usize)
    }
}

/// A per-step number an op takes: fixed in the launch, or read by the kernel from a step table's column.
#[derive(Debug, Clone, Copy)]
pub enum At<'a> {
    Host(usize),
    Step(StepRow<'a>),
}

impl At<'_> {
    /// The number on the host (reads the table for [`At::Step`]).
    pub(crate) fn value(&self, col: usize) -> Result<usize> {
        match self {
            At::Host(v) => Ok(*v),
            At::Step(s) => s.read(col),
        }
    }
}

/// f32, bf16 or f16, else an error naming `op` and `what`.
pub(crate) fn check_act(op: &str, what: &str, dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        bail!("{op}: {what} must be f32, bf16 or f16, got {dtype:?}");
    }
    Ok(())
}

pub(crate) fn check_dtype(op: &str, what: &str, t: &Tensor, want: DType) -> Result<()> {
    if t.dtype() != want {
        bail!("{op}: {what} must be {want:?}, got {:?}", t.dtype());
    }
    Ok(())
}

pub(crate) fn same_device(op: &str, ts: &[(&str, &Tensor)]) -> Result<()> {
    let (n0, t0) = ts[0];
    for &(n, t) in &ts[1..] {
        if !t.device().same_device(t0.device()) {
            bail!(
                "{op}: {n0} is on {:?} but {n} is on {:?}",
                t0.device().location(),
                t.device().location()
            );
        }
    }
    Ok(())
}

/// The kernel-name suffix of an activation dtype: `f32`, `bf16` or `f16`.
pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("no kernel instantiation for {d:?}"),
    })
}

/// `n` as a grid dimension, or an error naming the op, what `n` counts and the limit (2^31-1 for x, 65535 for y
/// and z).
pub(crate) fn grid_dim(op: &str, what: &str, n: usize, limit: u32) -> Result<u32> {
    match u32::try_from(n) {
        Ok(v) if v <= limit => Ok(v),
        _ => bail!("{op}: {n} {what} exceed the launch grid's limit of {limit}"),
    }
}

/// Host copy of a tensor's elements (row-major), for the CPU references.
pub(crate) fn host<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

static POISON: AtomicBool = AtomicBool::new(false);

/// When on, every CUDA launcher of this crate fills its freshly allocated outputs with 0xFF bytes (NaN for
/// f32/bf16/f16, 0xffffffff for u32) before the kernel runs, so an element the kernel fails to write shows up
/// in the self-test instead of passing by luck. Off by default (it costs a memset per output).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::SeqCst);
}

pub fn poison_outputs() -> bool {
    POISON.load(Ordering::SeqCst)
}

/// The streaming multiprocessors of `device`'s GPU, asked of the driver once per GPU; `None` off CUDA (or
/// when the driver does not say). The quantized products' GEMV/GEMM choice counts blocks against it.
pub fn gpu_sm_count(device: &candle_core::Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        // Per ordinal (the first 16 GPUs): 0 not asked yet, usize::MAX the driver did not say, else
        // the count. One atomic load per call: it runs per quantized linear of every decode step.
        use std::sync::atomic::AtomicUsize;
        static SMS: [AtomicUsize; 16] = [const { AtomicUsize::new(0) }; 16];
        let stream = d.cuda_stream();
        let ctx = stream.context();
        let slot = SMS.get(ctx.ordinal());
        let known = slot.map_or(0, |s| s.load(Ordering::Relaxed));
        if known != 0 {
            return (known != usize::MAX).then_some(known);
        }
        let n = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0 && n != usize::MAX);
        if let Some(s) = slot {
            s.store(n.unwrap_or(usize::MAX), Ordering::Relaxed);
        }
        return n;
    }
    let _ = device;
    None
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtrMut, DeviceRepr};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, Result, Shape, Storage, Tensor};

    /// `len` elements (at least one, so a view of an empty output is still a valid pointer), poisoned
    /// when [`super::poison_outputs`] is on.
    pub fn alloc_out<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller's kernel writes the elements it documents; the rest is unspecified.
        let mut s = unsafe { dev.alloc::<T>(len.max(1))? };
        if super::poison_outputs() {
            let stream = dev.cuda_stream();
            let bytes = len.max(1) * std::mem::size_of::<T>();
            let (ptr, _sync) = s.device_ptr_mut(&stream);
            // SAFETY: ptr is a live allocation of `bytes` bytes on this stream.
            unsafe {
                candle_core::cuda_backend::cudarc::driver::result::memset_d8_async(
                    ptr,
                    0xff,
                    bytes,
                    stream.cu_stream(),
                )
            }
            .w()?;
        }
        Ok(s)
    }

    /// A tensor owning `slice` (contiguous, `shape`), on `dev`.
    pub fn wrap(slice: CudaStorageSlice, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
        let storage = Storage::Cuda(CudaStorage {
            slice,
            device: dev.clone(),
        });
        Tensor::from_storage(storage, shape, BackpropOp::none(), false)
    }
}
