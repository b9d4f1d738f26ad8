//! An op's kernel launches as data: which entry points, on what grid, with which arguments, reading which input
//! tensors and writing which outputs. Each launcher builds its [`Plan`] with a pure function (the launch
//! geometry and argument list in one place), and [`Plan::run`] executes it on the inputs' device:
//! - CUDA (feature `cuda`): the PTX of `cuda/<module>.cu` on candle's stream;
//! - the CPU with the emulator on (feature `emu`, [`crate::emu`]): the same `.cu` source compiled for the CPU,
//!   so the emulator checks the launcher/kernel contract (geometry, argument order and types) too.
//!
//! Launches whose grid would be empty are left out of the plan by the builders, as CUDA rejects them.

pub mod plan;

pub use plan::{Alloc, Arg, Buf, Launch, Plan};

use candle_core::{bail, Device, Result, Tensor};

thread_local! {
    /// Kernel launches made by plans on this thread (CUDA or the emulator).
    static LAUNCHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

thread_local! {
    static RECORDING: std::cell::RefCell<Option<Vec<Recorded>>> = const { std::cell::RefCell::new(None) };
}

/// A plan as [`record`] saw it run: the op, its launches (entry points, grids, blocks and arguments, which
/// name buffers by role and carry every scalar) and each input's shape and offset into its storage. Two
/// runs that record the same sequence launch the same kernels with the same scalars on buffers at the same
/// offsets: what replaying one captured CUDA graph for both needs of moe-kernels' ops.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub op: &'static str,
    pub launches: Vec<Launch>,
    pub inputs: Vec<(Vec<usize>, usize)>,
}

/// Runs `f` and returns what it returned with every plan this thread ran meanwhile, in order.
pub fn record<T>(f: impl FnOnce() -> T) -> (T, Vec<Recorded>) {
    let prev = RECORDING.with(|r| r.borrow_mut().replace(Vec::new()));
    let out = f();
    let got = RECORDING.with(|r| std::mem::replace(&mut *r.borrow_mut(), prev));
    (out, got.unwrap_or_default())
}

/// Kernel launches this thread's plans have made so far, on CUDA or the emulator: the launches
/// of moe-kernels' own ops (candle's ops, which a CUDA step also launches, are not counted).
pub fn launched() -> u64 {
    LAUNCHED.with(std::cell::Cell::get)
}

/// Counts one replay of a captured CUDA graph as one launch.
pub fn count_graph_replay() {
    LAUNCHED.with(|c| c.set(c.get() + 1));
}

/// Sets this thread's launch count back to `mark` (an earlier [`launched`]): the plans a CUDA graph
/// capture runs record launches without making them.
pub fn rewind_launched(mark: u64) {
    LAUNCHED.with(|c| c.set(mark.min(c.get())));
}

impl Plan {
    /// Runs the plan on the device of `inputs` and returns the outputs.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        LAUNCHED.with(|c| c.set(c.get() + self.launches.len() as u64));
        RECORDING.with(|r| {
            if let Some(v) = r.borrow_mut().as_mut() {
                v.push(Recorded {
                    op: self.op,
                    launches: self.launches.clone(),
                    inputs: inputs
                        .iter()
                        .map(|t| (t.dims().to_vec(), t.layout().start_offset()))
                        .collect(),
                });
            }
        });
        if inputs.len() != self.inputs.len() {
            bail!(
                "{}: plan takes {} inputs, got {}",
                self.op,
                self.inputs.len(),
                inputs.len()
            );
        }
        let Some(first) = inputs.first() else {
            bail!("{}: a plan needs at least one input", self.op)
        };
        for &i in &self.writes {
            match inputs.get(i) {
                Some(t) if t.is_contiguous() => {}
                _ => bail!(
                    "{}: {} is written in place and must be a contiguous input",
                    self.op,
                    self.buf_name(Buf::In(i))
                ),
            }
        }
        match first.device() {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => cuda_exec::run(self, inputs),
            #[cfg(feature = "emu")]
            Device::Cpu => crate::emu::run(self, inputs),
            d => bail!(
                "{}: no kernel executor for device {:?} in this build",
                self.op,
                d.location()
            ),
        }
    }
}

/// Where an op runs its launch plan rather than the CPU reference: on CUDA always, on the CPU when the
/// emulator is on for this thread.
pub fn runs_kernels(device: &Device) -> bool {
    match device {
        Device::Cpu => crate::emu::active(),
        _ => device.is_cuda(),
    }
}

#[cfg(feature = "cuda")]
mod cuda_exec {
    //! The CUDA executor: candle's device, its stream, and the PTX of each module loaded once per device.
    use super::{Arg, Buf, Plan};
    use crate::common::cuda::{alloc_out, wrap};
    use crate::cuda_util::{contiguous, module_key};
    use candle_core::cuda_backend::cudarc::driver::{
        sys, CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{bail, CudaDevice, DType, Result, Storage, Tensor};
    use half::{bf16, f16};
    use std::collections::HashMap;
    use std::rc::Rc;

    /// Device copies of the host tables plans upload ([`Plan::upload`]), per device and content. A
    /// decode step's tables repeat (a dense quantized linear's chunk table for M = 1 is always
    /// `[0, 0, 1]`), so each distinct table crosses from pageable host memory once instead of on every
    /// call. Bounded: past [`UPLOAD_CACHE_MAX`] tables the cache starts over (a freed slice's
    /// `cudaFreeAsync` is ordered after the kernels already queued on the stream).
    const UPLOAD_CACHE_MAX: usize = 4096;

    type UploadKey = (candle_core::cuda_backend::DeviceId, Vec<u32>);

    thread_local! {
        static UPLOADED: std::cell::RefCell<HashMap<UploadKey, Rc<CudaSlice<u32>>>> =
            std::cell::RefCell::new(HashMap::new());
    }

    fn uploaded(dev: &CudaDevice, table: &[u32]) -> Result<Rc<CudaSlice<u32>>> {
        UPLOADED.with(|c| {
            let mut c = c.borrow_mut();
            let key = (dev.id(), table.to_vec());
            if let Some(s) = c.get(&key) {
                return Ok(s.clone());
            }
            // Never while a CUDA graph is being captured: freeing memory allocated before the
            // capture would become a free node that every replay runs again.
            let capturing = !matches!(
                dev.cuda_stream().capture_status(),
                Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
            );
            if c.len() >= UPLOAD_CACHE_MAX && !capturing {
                c.clear();
            }
            let s = Rc::new(dev.clone_htod(table)?);
            c.insert(key, s.clone());
            Ok(s)
        })
    }

    enum View<'a> {
        U8(CudaView<'a, u8>),
        U32(CudaView<'a, u32>),
        I64(CudaView<'a, i64>),
        F32(CudaView<'a, f32>),
        BF16(CudaView<'a, bf16>),
        F16(CudaView<'a, f16>),
    }

    enum Owned {
        U8(CudaSlice<u8>),
        U32(CudaSlice<u32>),
        F32(CudaSlice<f32>),
        BF16(CudaSlice<bf16>),
        F16(CudaSlice<f16>),
    }

    fn alloc(dev: &CudaDevice, dtype: DType, len: usize, op: &str) -> Result<Owned> {
        Ok(match dtype {
            DType::U8 => Owned::U8(alloc_out(dev, len)?),
            DType::U32 => Owned::U32(alloc_out(dev, len)?),
            DType::F32 => Owned::F32(alloc_out(dev, len)?),
            DType::BF16 => Owned::BF16(alloc_out(dev, len)?),
            DType::F16 => Owned::F16(alloc_out(dev, len)?),
            d => bail!("{op}: cannot allocate a kernel buffer of {d:?}"),
        })
    }

    fn push_owned<'b>(b: &mut LaunchArgs<'b>, o: &'b Owned) {
        match o {
            Owned::U8(s) => b.arg(s),
            Owned::U32(s) => b.arg(s),
            Owned::F32(s) => b.arg(s),
            Owned::BF16(s) => b.arg(s),
            Owned::F16(s) => b.arg(s),
        };
    }

    fn push_view<'b>(b: &mut LaunchArgs<'b>, v: &'b View<'b>) {
        match v {
            View::U8(s) => b.arg(s),
            View::U32(s) => b.arg(s),
            View::I64(s) => b.arg(s),
            View::F32(s) => b.arg(s),
            View::BF16(s) => b.arg(s),
            View::F16(s) => b.arg(s),
        };
    }

    pub fn run(plan: &Plan, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let op = plan.op;
        let inputs: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.contiguous())
            .collect::<Result<_>>()?;
        let guards: Vec<_> = inputs.iter().map(|t| t.storage_and_layout()).collect();
        let mut views = Vec::with_capacity(guards.len());
        let mut dev = None;
        for ((st, l), name) in guards.iter().zip(&plan.inputs) {
            let Storage::Cuda(cs) = &**st else {
                bail!("{op}: {name} is not on a CUDA device")
            };
            dev.get_or_insert_with(|| cs.device.clone());
            views.push(match &cs.slice {
                CudaStorageSlice::U8(s) => View::U8(contiguous(s, l, op, name)?),
                CudaStorageSlice::U32(s) => View::U32(contiguous(s, l, op, name)?),
                CudaStorageSlice::I64(s) => View::I64(contiguous(s, l, op, name)?),
                CudaStorageSlice::F32(s) => View::F32(contiguous(s, l, op, name)?),
                CudaStorageSlice::BF16(s) => View::BF16(contiguous(s, l, op, name)?),
                CudaStorageSlice::F16(s) => View::F16(contiguous(s, l, op, name)?),
                _ => bail!("{op}: {name} has a dtype no kernel takes"),
            });
        }
        let Some(dev) = dev else {
            bail!("{op}: no inputs")
        };
        let outs: Vec<Owned> = plan
            .outs
            .iter()
            .map(|a| alloc(&dev, a.dtype, a.shape.elem_count(), op))
            .collect::<Result<_>>()?;
        let tmps: Vec<Owned> = plan
            .tmps
            .iter()
            .map(|a| alloc(&dev, a.dtype, a.shape.elem_count(), op))
            .collect::<Result<_>>()?;
        let uploads: Vec<Rc<CudaSlice<u32>>> = plan
            .uploads
            .iter()
            .map(|(_, v)| uploaded(&dev, v))
            .collect::<Result<_>>()?;
        let null = 0u64;
        for l in &plan.launches {
            let Some(m) = crate::ptx::ALL.iter().find(|m| m.name == l.module) else {
                bail!("{op}: no compiled module {}", l.module)
            };
            let func = dev.get_or_load_custom_func(&l.entry, &module_key(m), m.ptx)?;
            let mut b = func.builder();
            for a in &l.args {
                match a {
                    Arg::Buf(Buf::In(i)) => push_view(&mut b, &views[*i]),
                    Arg::Buf(Buf::Out(i)) => push_owned(&mut b, &outs[*i]),
                    Arg::Buf(Buf::Tmp(i)) => push_owned(&mut b, &tmps[*i]),
                    Arg::Buf(Buf::Upload(i)) => {
                        b.arg(&*uploads[*i]);
                    }
                    Arg::Null => {
                        b.arg(&null);
                    }
                    Arg::U32(v) => {
                        b.arg(v);
                    }
                    Arg::F32(v) => {
                        b.arg(v);
                    }
                }
            }
            let cfg = LaunchConfig {
                grid_dim: (l.grid[0], l.grid[1], l.grid[2]),
                block_dim: (l.block[0], l.block[1], l.block[2]),
                shared_mem_bytes: 0,
            };
            // SAFETY: the plan's builder lists the entry point's parameters in order with buffers of the sizes
            // the kernel reads and writes for this geometry; the emulator (feature `emu`) runs the same plan
            // against the kernel's own source with every argument checked against its parameter list.
            unsafe { b.launch(cfg) }.w()?;
        }
        drop(tmps);
        Ok(outs
            .into_iter()
            .zip(&plan.outs)
            .map(|(o, a)| {
                let slice = match o {
                    Owned::U8(s) => CudaStorageSlice::U8(s),
                    Owned::U32(s) => CudaStorageSlice::U32(s),
                    Owned::F32(s) => CudaStorageSlice::F32(s),
                    Owned::BF16(s) => CudaStorageSlice::BF16(s),
                    Owned::F16(s) => CudaStorageSlice::F16(s),
                };
                wrap(slice, &dev, a.shape.clone())
            })
            .collect())
    }
}
