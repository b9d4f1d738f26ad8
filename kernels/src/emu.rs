//! The CPU emulator of the CUDA kernels (feature `emu`): every `cuda/*.cu` compiled as C++ for the CPU against
//! `emu/emu.h` (one fiber per GPU thread; barriers and warp collectives are meeting points where divergence is
//! reported; buffers fenced by guard pages and canaries; read-only inputs write-protected). With the emulator
//! on for a thread ([`enable`]), every op called on the CPU from that thread runs its launch plan
//! ([`crate::launch::plan::Plan`]) through the emulated kernels instead of the plain-Rust reference, so the self-test
//! (`moe-run selftest --device emu`) and the model's kernel path execute the kernels' own source.
//!
//! What it proves: indexing, bounds, barriers and warp-collective convergence, launch geometry and the
//! launcher/kernel argument contract, and the numerics of the kernel's arithmetic (IEEE f32 without FMA
//! contraction, round-to-nearest-even bf16/f16). What it cannot: timing-dependent races between blocks or
//! within a warp (blocks run one after another, fibers switch only at barriers and collectives), memory-model
//! subtleties, register/shared-memory limits and speed.

use std::cell::Cell;

use candle_core::{bail, Result};

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static LAUNCHES: std::cell::RefCell<std::collections::BTreeMap<String, u64>> =
        const { std::cell::RefCell::new(std::collections::BTreeMap::new()) };
}

/// How many times each entry point was launched through the emulator on this thread (so a test can prove
/// which kernels a forward pass really ran).
pub fn launch_counts() -> std::collections::BTreeMap<String, u64> {
    LAUNCHES.with(|l| l.borrow().clone())
}

#[cfg(feature = "emu")]
fn count_launch(entry: &str) {
    LAUNCHES.with(|l| *l.borrow_mut().entry(entry.to_string()).or_default() += 1);
}

/// Whether this build contains the emulator (feature `emu`).
pub fn available() -> bool {
    cfg!(feature = "emu")
}

/// Whether ops called from this thread run their kernels through the emulator.
pub fn active() -> bool {
    available() && ACTIVE.with(Cell::get)
}

/// Turns the emulator on for this thread until the guard drops; an error in a build without it.
pub fn enable() -> Result<Scope> {
    if !available() {
        bail!("this build has no kernel emulator: build with `--features emu` (needs g++)");
    }
    let prev = ACTIVE.with(|a| a.replace(true));
    Ok(Scope { prev })
}

/// Runs `f` with the emulator off on this thread: what the self-test uses to compute the expected side of a
/// case with the CPU reference while the ops under test run emulated.
pub fn without<T>(f: impl FnOnce() -> T) -> T {
    let prev = ACTIVE.with(|a| a.replace(false));
    let _restore = Scope { prev };
    f()
}

/// Restores the previous emulator state of the thread when dropped.
#[must_use = "the emulator stays on only while the scope lives"]
pub struct Scope {
    prev: bool,
}

impl Drop for Scope {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.prev));
    }
}

#[cfg(feature = "emu")]
pub use imp::{launch_raw, EmuArg, EmuBuf};

#[cfg(feature = "emu")]
pub(crate) use imp::run;

#[cfg(feature = "emu")]
mod imp {
    use std::ffi::{c_char, c_void, CStr, CString};

    use candle_core::{bail, DType, Device, Result, Tensor};

    use crate::launch::plan::{Arg, Buf, Plan};

    extern "C" {
        fn moe_emu_buf_new(bytes: usize, name: *const c_char, misalign: usize) -> *mut c_void;
        fn moe_emu_buf_protect(data: *mut c_void);
        fn moe_emu_buf_check(data: *mut c_void, err: *mut c_char, errlen: usize) -> i32;
        fn moe_emu_buf_free(data: *mut c_void);
        #[allow(clippy::too_many_arguments)]
        fn moe_emu_launch(
            name: *const c_char,
            grid: *const u32,
            block: *const u32,
            shared_bytes: u32,
            nargs: u32,
            kinds: *const c_char,
            sizes: *const u32,
            args: *const *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> i32;
    }

    const ERR_LEN: usize = 4096;

    fn message(buf: &[u8]) -> String {
        CStr::from_bytes_until_nul(buf)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// A buffer a kernel may access: at the end of its own mapping, fenced by a guard page and canary bytes.
    pub struct EmuBuf {
        ptr: *mut c_void,
        bytes: usize,
        elem: u32,
        name: String,
    }

    impl EmuBuf {
        /// `bytes` zeroed bytes of elements of `elem` bytes, named `name` in error messages, 16-byte aligned.
        pub fn new(bytes: usize, elem: usize, name: &str) -> Result<Self> {
            Self::new_at(bytes, elem, name, 0)
        }

        /// [`Self::new`] starting `misalign` (mod 16) bytes past a 16-byte boundary.
        fn new_at(bytes: usize, elem: usize, name: &str, misalign: usize) -> Result<Self> {
            let c = CString::new(name).unwrap_or_default();
            // SAFETY: plain allocation; the runtime copies the name.
            let ptr = unsafe { moe_emu_buf_new(bytes, c.as_ptr(), misalign) };
            if ptr.is_null() {
                bail!("emulator: cannot map a buffer of {bytes} bytes for {name}");
            }
            Ok(EmuBuf {
                ptr,
                bytes,
                elem: elem as u32,
                name: name.to_string(),
            })
        }

        /// A buffer holding `data`, write-protected when `read_only`.
        pub fn from_bytes(data: &[u8], elem: usize, name: &str, read_only: bool) -> Result<Self> {
            Self::from_bytes_at(data, elem, name, read_only, 0)
        }

        /// [`Self::from_bytes`] starting `misalign` (mod 16) bytes past a 16-byte boundary.
        fn from_bytes_at(
            data: &[u8],
            elem: usize,
            name: &str,
            read_only: bool,
            misalign: usize,
        ) -> Result<Self> {
            let b = Self::new_at(data.len(), elem, name, misalign)?;
            // SAFETY: the buffer has exactly data.len() writable bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.ptr.cast::<u8>(), data.len()) };
            if read_only {
                // SAFETY: ptr came from moe_emu_buf_new.
                unsafe { moe_emu_buf_protect(b.ptr) };
            }
            Ok(b)
        }

        pub fn fill(&mut self, byte: u8) {
            // SAFETY: the buffer has self.bytes writable bytes (outputs are never protected).
            unsafe { std::ptr::write_bytes(self.ptr.cast::<u8>(), byte, self.bytes) };
        }

        pub fn bytes(&self) -> Vec<u8> {
            // SAFETY: the buffer has self.bytes readable bytes.
            unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.bytes) }.to_vec()
        }

        /// An error when a kernel wrote into the canary bytes around the buffer.
        pub fn check(&self) -> Result<()> {
            let mut err = [0u8; ERR_LEN];
            // SAFETY: ptr came from moe_emu_buf_new; err is ERR_LEN bytes.
            if unsafe { moe_emu_buf_check(self.ptr, err.as_mut_ptr().cast(), ERR_LEN) } != 0 {
                bail!("{}", message(&err));
            }
            Ok(())
        }

        pub fn name(&self) -> &str {
            &self.name
        }
    }

    impl Drop for EmuBuf {
        fn drop(&mut self) {
            // SAFETY: ptr came from moe_emu_buf_new on this thread and is freed once.
            unsafe { moe_emu_buf_free(self.ptr) };
        }
    }

    /// One argument of [`launch_raw`].
    #[derive(Clone, Copy)]
    pub enum EmuArg<'a> {
        Buf(&'a EmuBuf),
        Null,
        U32(u32),
        F32(f32),
    }

    /// Launches entry point `entry` of the emulated kernels on `grid` x `block` threads with `args` in the
    /// kernel's parameter order; an error names the kernel, block, thread, site and what went wrong.
    pub fn launch_raw(entry: &str, grid: [u32; 3], block: [u32; 3], args: &[EmuArg]) -> Result<()> {
        let mut values: Vec<u64> = Vec::with_capacity(args.len());
        let mut kinds: Vec<c_char> = Vec::with_capacity(args.len());
        let mut sizes: Vec<u32> = Vec::with_capacity(args.len());
        for a in args {
            let (v, k, s) = match a {
                EmuArg::Buf(b) => (b.ptr as u64, b'p', b.elem),
                EmuArg::Null => (0, b'p', 0),
                EmuArg::U32(v) => (u64::from(*v), b'u', 4),
                EmuArg::F32(v) => (u64::from(v.to_bits()), b'f', 4),
            };
            values.push(v);
            kinds.push(k as c_char);
            sizes.push(s);
        }
        // kernelParams: a pointer to each value (little-endian, so a u32 or f32 sits in the low bytes).
        let ptrs: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| (v as *mut u64).cast::<c_void>())
            .collect();
        let name = CString::new(entry).unwrap_or_default();
        let mut err = [0u8; ERR_LEN];
        // SAFETY: every array has args.len() elements; buffer pointers are live EmuBufs of the sizes the caller
        // computed, and the runtime checks the argument kinds against the kernel's parameters.
        let rc = unsafe {
            moe_emu_launch(
                name.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                0,
                args.len() as u32,
                kinds.as_ptr(),
                sizes.as_ptr(),
                ptrs.as_ptr(),
                err.as_mut_ptr().cast(),
                ERR_LEN,
            )
        };
        super::count_launch(entry);
        if rc != 0 {
            bail!("emulated kernel {}", message(&err));
        }
        for a in args {
            if let EmuArg::Buf(b) = a {
                b.check().map_err(|e| {
                    candle_core::Error::Msg(format!("emulated kernel {entry}: {e}"))
                })?;
            }
        }
        Ok(())
    }

    fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
        let t = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::U8 => t.to_vec1::<u8>()?,
            DType::U32 => t
                .to_vec1::<u32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::I64 => t
                .to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F32 => t
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::BF16 => t
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F16 => t
                .to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            d => bail!("emulator: no kernel takes {d:?}"),
        })
    }

    /// Runs `plan` through the emulated kernels on CPU tensors. Outputs and scratch buffers start as 0xFF bytes
    /// (NaN / 0xffffffff), so an element no kernel writes shows up.
    pub(crate) fn run(plan: &Plan, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let op = plan.op;
        let ins: Vec<EmuBuf> = inputs
            .iter()
            .zip(&plan.inputs)
            .enumerate()
            .map(|(i, (t, name))| {
                let read_only = !plan.writes.contains(&i);
                // A contiguous view's byte offset into its storage: on CUDA the kernel gets a pointer that
                // far into a 256-byte-aligned allocation, so its alignment is reproduced here.
                let elem = t.dtype().size_in_bytes();
                let misalign = match t.is_contiguous() {
                    true => t.layout().start_offset() * elem % 16,
                    false => 0,
                };
                EmuBuf::from_bytes_at(&tensor_bytes(t)?, elem, name, read_only, misalign)
            })
            .collect::<Result<_>>()?;
        let alloc = |a: &crate::launch::plan::Alloc| -> Result<EmuBuf> {
            let elem = a.dtype.size_in_bytes();
            let mut b = EmuBuf::new(a.shape.elem_count() * elem, elem, a.name)?;
            b.fill(0xff);
            Ok(b)
        };
        let outs: Vec<EmuBuf> = plan.outs.iter().map(alloc).collect::<Result<_>>()?;
        let tmps: Vec<EmuBuf> = plan.tmps.iter().map(alloc).collect::<Result<_>>()?;
        let uploads: Vec<EmuBuf> = plan
            .uploads
            .iter()
            .map(|(name, v)| {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmuBuf::from_bytes(&bytes, 4, name, true)
            })
            .collect::<Result<_>>()?;
        let buf = |b: Buf| -> Result<&EmuBuf> {
            let found = match b {
                Buf::In(i) => ins.get(i),
                Buf::Out(i) => outs.get(i),
                Buf::Tmp(i) => tmps.get(i),
                Buf::Upload(i) => uploads.get(i),
            };
            found.ok_or_else(|| candle_core::Error::Msg(format!("{op}: plan names missing {b:?}")))
        };
        for l in &plan.launches {
            let args: Vec<EmuArg> = l
                .args
                .iter()
                .map(|a| {
                    Ok(match *a {
                        Arg::Buf(b) => EmuArg::Buf(buf(b)?),
                        Arg::Null => EmuArg::Null,
                        Arg::U32(v) => EmuArg::U32(v),
                        Arg::F32(v) => EmuArg::F32(v),
                    })
                })
                .collect::<Result<_>>()?;
            launch_raw(&l.entry, l.grid, l.block, &args)
                .map_err(|e| candle_core::Error::Msg(format!("{op}: {e}")))?;
        }
        // Inputs written in place go back into the caller's (contiguous: checked by Plan::run) tensors.
        for &i in &plan.writes {
            let (t, b) = (inputs[i], &ins[i]);
            let back = Tensor::from_raw_buffer(&b.bytes(), t.dtype(), t.dims(), &Device::Cpu)?;
            t.slice_set(&back, 0, 0)?;
        }
        outs.iter()
            .zip(&plan.outs)
            .map(|(b, a)| {
                Tensor::from_raw_buffer(&b.bytes(), a.dtype, a.shape.dims(), &Device::Cpu)
            })
            .collect()
    }
}
