//! Every device-to-host read the engine makes at run time goes through here, and is counted.
//!
//! On a GPU a read stalls the host until the device has finished everything queued before it, so a decode
//! step should make exactly one: the sampled token id (greedy: argmax on the device) or, when sampling, the
//! logits. The counter is per thread (the decode loop runs on one thread; tests run in parallel threads) and
//! lets a test assert that the decode loop's code path makes no other read, e.g. routing to the host.
//!
//! A layer with experts in host memory also moves activations: [`to_host`] (a counted read) and
//! [`to_device`] (a counted upload, [`uploads`]). On CUDA both stage through a page-locked buffer
//! per thread and device, grown as needed and kept, so the copies run at the bus's speed without
//! the driver's own pageable-memory staging and without pinning memory per call.

use std::cell::Cell;

use candle_core::{Device, Result, Tensor, WithDType};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
    static UPLOADS: Cell<u64> = const { Cell::new(0) };
}

/// Device-to-host reads made by this thread so far.
pub fn reads() -> u64 {
    READS.with(Cell::get)
}

/// Host-to-device copies of activations ([`to_device`]) made by this thread so far.
pub fn uploads() -> u64 {
    UPLOADS.with(Cell::get)
}

fn count() {
    READS.with(|c| c.set(c.get() + 1));
}

/// All elements of `t` (any shape, row-major) on the host: one counted read.
pub fn read_vec<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    count();
    t.flatten_all()?.to_vec1::<T>()
}

/// The single element of `t`: one counted read.
pub fn read_scalar<T: WithDType>(t: &Tensor) -> Result<T> {
    count();
    t.flatten_all()?.squeeze(0)?.to_scalar::<T>()
}

/// `t` as a CPU tensor of its shape and dtype: one counted read. On CUDA (f32, bf16, f16) through
/// this thread's pinned buffer for the device; on the CPU the same storage (no copy).
pub fn to_host(t: &Tensor) -> Result<Tensor> {
    count();
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = t.device() {
        return pinned::to_host(t, d);
    }
    t.to_device(&Device::Cpu)
}

/// The CPU tensor `t` on `dev`: one counted upload. On CUDA (f32, bf16, f16) through this thread's
/// pinned buffer for the device, queued on its stream (the host does not wait for it); on the CPU
/// the same storage.
pub fn to_device(t: &Tensor, dev: &Device) -> Result<Tensor> {
    UPLOADS.with(|c| c.set(c.get() + 1));
    #[cfg(feature = "cuda")]
    if let (Device::Cpu, Device::Cuda(d)) = (t.device(), dev) {
        return pinned::to_device(t, d);
    }
    t.to_device(dev)
}

/// Overwrites the contiguous u32 tensor `dst` with `data`, in place: on CUDA one host-to-device copy
/// queued on the device's stream into the buffer `dst` already has (no allocation, no copy kernel,
/// no free), on the CPU a copy into its storage. Every tensor sharing the storage sees the new
/// values, which is how a decode step's small inputs (token ids, step tables) reach the buffers a
/// captured CUDA graph reads. Not counted: these are the step's own numbers, not activations.
pub fn write_u32(dst: &Tensor, data: &[u32]) -> Result<()> {
    if dst.dtype() != candle_core::DType::U32 || dst.elem_count() != data.len() {
        candle_core::bail!(
            "host::write_u32: {} values into a {:?} tensor of shape {:?}",
            data.len(),
            dst.dtype(),
            dst.dims()
        )
    }
    dst.inplace_op1(&WriteU32(data))
}

struct WriteU32<'a>(&'a [u32]);

impl WriteU32<'_> {
    fn span(&self, l: &candle_core::Layout) -> Result<(usize, usize)> {
        match l.contiguous_offsets() {
            Some(s) if s.1 - s.0 == self.0.len() => Ok(s),
            _ => candle_core::bail!("host::write_u32: the tensor must be contiguous"),
        }
    }
}

impl candle_core::InplaceOp1 for WriteU32<'_> {
    fn name(&self) -> &'static str {
        "write_u32"
    }

    fn cpu_fwd(&self, s: &mut candle_core::CpuStorage, l: &candle_core::Layout) -> Result<()> {
        let (a, b) = self.span(l)?;
        match s {
            candle_core::CpuStorage::U32(v) => v[a..b].copy_from_slice(self.0),
            _ => candle_core::bail!("host::write_u32: not a u32 tensor"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &candle_core::Layout) -> Result<()> {
        use candle_core::cuda_backend::WrapErr;
        let (a, b) = self.span(l)?;
        let stream = s.device.cuda_stream();
        let mut view = s.as_cuda_slice_mut::<u32>()?.slice_mut(a..b);
        stream.memcpy_htod(self.0, &mut view).w()
    }
}

#[cfg(feature = "cuda")]
mod pinned {
    //! Copies through one page-locked staging buffer per thread and device.
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::marker::PhantomData;

    use candle_core::cuda_backend::cudarc::driver::{
        CudaStream, DeviceRepr, HostSlice, PinnedHostSlice, SyncOnDrop,
    };
    use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{bail, CudaDevice, CudaStorage, DType, Device, Result, Storage, Tensor};
    use candle_core::{Layout, WithDType};
    use half::{bf16, f16};

    /// The smallest staging buffer (bytes); it grows to the next power of two past a copy.
    const MIN_STAGING: usize = 1 << 20;

    thread_local! {
        static STAGING: RefCell<HashMap<DeviceId, PinnedHostSlice<u8>>> =
            RefCell::new(HashMap::new());
    }

    /// `f` on this thread's staging buffer for `d`, at least `bytes` long. The buffer's event
    /// orders its uses: cudarc records it after each copy and waits for it before the next one,
    /// and before the host touches the buffer (`as_slice`, `as_mut_slice`).
    fn with_staging<R>(
        d: &CudaDevice,
        bytes: usize,
        f: impl FnOnce(&mut PinnedHostSlice<u8>) -> Result<R>,
    ) -> Result<R> {
        STAGING.with(|s| {
            let mut s = s.borrow_mut();
            if s.get(&d.id()).is_none_or(|b| b.len() < bytes) {
                // Dropping the old buffer first waits for the copies still using it.
                s.remove(&d.id());
                let len = bytes.max(MIN_STAGING).next_power_of_two();
                let ctx = d.cuda_stream().context().clone();
                // Flags 0, not `alloc_pinned`'s write-combined memory: the host reads this back,
                // and reads of write-combined memory are uncached.
                // SAFETY: the bytes are uninitialized; every use writes before it reads.
                let b = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }.w()?;
                s.insert(d.id(), b);
            }
            match s.get_mut(&d.id()) {
                Some(b) => f(b),
                None => bail!("host: no staging buffer"),
            }
        })
    }

    /// The first `len` `T`s of a staging buffer, for cudarc's copies. The buffer is page-aligned,
    /// so aligned for any `T`, and at least `len * size_of::<T>()` bytes long ([`with_staging`]).
    struct Prefix<'a, T> {
        buf: &'a mut PinnedHostSlice<u8>,
        len: usize,
        _t: PhantomData<T>,
    }

    impl<'a, T> Prefix<'a, T> {
        fn new(buf: &'a mut PinnedHostSlice<u8>, len: usize) -> Self {
            assert!(len * std::mem::size_of::<T>() <= buf.len());
            Prefix {
                buf,
                len,
                _t: PhantomData,
            }
        }
    }

    impl<T> HostSlice<T> for Prefix<'_, T> {
        fn len(&self) -> usize {
            self.len
        }

        unsafe fn stream_synced_slice<'a>(
            &'a self,
            stream: &'a CudaStream,
        ) -> (&'a [T], SyncOnDrop<'a>) {
            let (b, sync) = self.buf.stream_synced_slice(stream);
            (
                std::slice::from_raw_parts(b.as_ptr().cast(), self.len),
                sync,
            )
        }

        unsafe fn stream_synced_mut_slice<'a>(
            &'a mut self,
            stream: &'a CudaStream,
        ) -> (&'a mut [T], SyncOnDrop<'a>) {
            let (b, sync) = self.buf.stream_synced_mut_slice(stream);
            (
                std::slice::from_raw_parts_mut(b.as_mut_ptr().cast(), self.len),
                sync,
            )
        }
    }

    fn span(l: &Layout) -> Result<(usize, usize)> {
        match l.contiguous_offsets() {
            Some(s) => Ok(s),
            None => bail!("host: a contiguous tensor without contiguous offsets"),
        }
    }

    pub fn to_host(t: &Tensor, d: &CudaDevice) -> Result<Tensor> {
        match t.dtype() {
            DType::F32 => read::<f32>(t, d),
            DType::BF16 => read::<bf16>(t, d),
            DType::F16 => read::<f16>(t, d),
            _ => t.to_device(&Device::Cpu),
        }
    }

    pub fn to_device(t: &Tensor, d: &CudaDevice) -> Result<Tensor> {
        match t.dtype() {
            DType::F32 => write::<f32>(t, d),
            DType::BF16 => write::<bf16>(t, d),
            DType::F16 => write::<f16>(t, d),
            _ => t.to_device(&Device::Cuda(d.clone())),
        }
    }

    fn read<T: CudaDType + DeviceRepr + WithDType>(t: &Tensor, d: &CudaDevice) -> Result<Tensor> {
        let n = t.elem_count();
        if n == 0 {
            return Tensor::zeros(t.shape(), t.dtype(), &Device::Cpu);
        }
        let t = t.contiguous()?;
        let (st, l) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            bail!("host::to_host: the tensor is not on a CUDA device")
        };
        let (start, end) = span(l)?;
        let src = cs.as_cuda_slice::<T>()?.slice(start..end);
        with_staging(d, n * std::mem::size_of::<T>(), |buf| {
            d.memcpy_dtoh(&src, &mut Prefix::<T>::new(buf, n))?;
            // Waits for the copy.
            let b = buf.as_slice().w()?;
            // SAFETY: the copy above wrote `n` `T`s at the buffer's (aligned) start.
            let host = unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<T>(), n) };
            Tensor::from_slice(host, t.shape(), &Device::Cpu)
        })
    }

    fn write<T: CudaDType + DeviceRepr + WithDType>(t: &Tensor, d: &CudaDevice) -> Result<Tensor> {
        let n = t.elem_count();
        if n == 0 {
            return Tensor::zeros(t.shape(), t.dtype(), &Device::Cuda(d.clone()));
        }
        let t = t.contiguous()?;
        let (st, l) = t.storage_and_layout();
        let Storage::Cpu(cs) = &*st else {
            bail!("host::to_device: the tensor is not in host memory")
        };
        let (start, end) = span(l)?;
        let src = &cs.as_slice::<T>()?[start..end];
        let dst = with_staging(d, n * std::mem::size_of::<T>(), |buf| {
            // Waits until the buffer's last copy is done before overwriting it.
            let b = buf.as_mut_slice().w()?;
            // SAFETY: the buffer holds at least `n` `T`s ([`with_staging`]) and is aligned.
            let staged = unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast::<T>(), n) };
            staged.copy_from_slice(src);
            // SAFETY: the copy below writes all `n` elements.
            let mut dst = unsafe { d.alloc::<T>(n) }?;
            d.memcpy_htod(&Prefix::<T>::new(buf, n), &mut dst)?;
            Ok(dst)
        })?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(dst, d.clone()));
        Ok(Tensor::from_storage(
            storage,
            t.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_read_on_this_thread() {
        let before = reads();
        let t = Tensor::new(&[3u32, 4], &Device::Cpu).unwrap();
        assert_eq!(read_vec::<u32>(&t).unwrap(), vec![3, 4]);
        assert_eq!(read_scalar::<u32>(&t.narrow(0, 1, 1).unwrap()).unwrap(), 4);
        assert_eq!(reads() - before, 2);
        let other = std::thread::spawn(reads).join().unwrap();
        assert_eq!(other, 0, "the counter is per thread");
    }

    #[test]
    fn activation_copies_are_counted_and_keep_values() {
        let (r, u) = (reads(), uploads());
        let t = Tensor::new(&[[1.5f32, -2.0], [0.25, 8.0]], &Device::Cpu).unwrap();
        let h = to_host(&t.t().unwrap()).unwrap();
        assert_eq!(
            h.to_vec2::<f32>().unwrap(),
            vec![vec![1.5, 0.25], vec![-2.0, 8.0]]
        );
        let back = to_device(&h, &Device::Cpu).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), h.to_vec2::<f32>().unwrap());
        assert_eq!((reads() - r, uploads() - u), (1, 1));
    }

    #[test]
    fn write_u32_overwrites_in_place_and_checks_its_target() {
        let (r, u) = (reads(), uploads());
        let t = Tensor::zeros((2, 3), candle_core::DType::U32, &Device::Cpu).unwrap();
        let shared = t.clone();
        write_u32(&t, &[1, 2, 3, 4, 5, 6]).unwrap();
        // The same storage: every tensor holding it (a captured graph's view) sees the values.
        assert_eq!(shared.to_vec2::<u32>().unwrap(), [[1, 2, 3], [4, 5, 6]]);
        // A contiguous row of it is written where it lies.
        write_u32(&t.narrow(0, 1, 1).unwrap(), &[7, 8, 9]).unwrap();
        assert_eq!(shared.to_vec2::<u32>().unwrap(), [[1, 2, 3], [7, 8, 9]]);
        assert_eq!((reads() - r, uploads() - u), (0, 0), "not counted");
        let err = |t: &Tensor, v: &[u32]| write_u32(t, v).unwrap_err().to_string();
        assert!(err(&t, &[1, 2]).contains("2 values into a U32 tensor of shape [2, 3]"));
        assert!(err(&t.to_dtype(candle_core::DType::F32).unwrap(), &[0; 6]).contains("F32"));
        assert!(err(&t.t().unwrap(), &[0; 6]).contains("contiguous"));
        assert_eq!(shared.to_vec2::<u32>().unwrap(), [[1, 2, 3], [7, 8, 9]]);
    }
}
