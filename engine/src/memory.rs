//! Memory as the OS (CPU runs) and the CUDA driver (GPU runs) report it, and the check that a
//! model fits before anything is allocated.

use candle_core::Device;

use crate::error::{Error, Result};

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub use crate::units::human_bytes;

/// `(free, total)` bytes of `device` as the CUDA driver reports them (`cuMemGetInfo`); `None` on
/// the CPU or in a build without CUDA.
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some((free as u64, total as u64));
    }
    let _ = device;
    None
}

/// High-water marks `(used, reserved)` in bytes of the CUDA driver's default memory pool of
/// `device`, where candle's stream-ordered allocations (`cuMemAllocAsync`) come from; `None` on the
/// CPU, without CUDA, or where the device has no stream-ordered allocator.
pub fn pool_high_water(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let pool = default_pool(d)?;
        let get = |attr: sys::CUmemPool_attribute| -> Option<u64> {
            let mut v: u64 = 0;
            // SAFETY: `pool` is the device's live default pool; both attributes are cuuint64_t.
            unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
                .result()
                .ok()?;
            Some(v)
        };
        return Some((
            get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        ));
    }
    let _ = device;
    None
}

/// Resets [`pool_high_water`]'s marks to the pool's current use (so a later reading is the peak
/// of what ran in between). Does nothing where there is no pool.
pub fn reset_pool_high_water(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let Some(pool) = default_pool(d) else { return };
        for attr in [
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
        ] {
            let mut zero: u64 = 0;
            // SAFETY: as above; the driver only accepts 0 for these two (reset to current).
            let _ =
                unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut zero as *mut u64).cast()) };
        }
    }
    let _ = device;
}

#[cfg(feature = "cuda")]
fn default_pool(
    d: &candle_core::CudaDevice,
) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = d.cuda_stream();
    let ctx = stream.context();
    if !ctx.has_async_alloc() {
        return None;
    }
    ctx.bind_to_thread().ok()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one pool handle for a valid device ordinal.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .ok()?;
    Some(pool)
}

/// Errors with [`Error::OutOfMemory`] when `need` bytes cannot fit in `free`. Pure.
pub fn check_fits(device: &str, what: &str, need: u64, free: u64, total: u64) -> Result<()> {
    if need <= free {
        return Ok(());
    }
    Err(Error::OutOfMemory {
        device: device.to_string(),
        what: what.to_string(),
        need,
        free,
        total,
        hint: "try --quant int4 or int8, a smaller model, or (bench) --layers N".into(),
    })
}

/// `(available, total)` bytes of host memory this process may still use: the smallest of the
/// kernel's MemAvailable (of MemTotal), the cgroup v2 limit less its current use, and the
/// address-space limit (`ulimit -v`) less this process's size. `None` where none is readable.
pub fn host_memory() -> Option<(u64, u64)> {
    let kib = |text: &str, key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    let mut best: Option<(u64, u64)> = None;
    let mut consider = |avail: u64, total: u64| {
        if best.is_none_or(|(a, _)| avail < a) {
            best = Some((avail, total));
        }
    };
    if let Ok(m) = std::fs::read_to_string("/proc/meminfo") {
        if let (Some(a), Some(t)) = (kib(&m, "MemAvailable:"), kib(&m, "MemTotal:")) {
            consider(a, t);
        }
    }
    let read_u64 = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    if let (Some(max), Some(cur)) = (
        read_u64("/sys/fs/cgroup/memory.max"),
        read_u64("/sys/fs/cgroup/memory.current"),
    ) {
        consider(max.saturating_sub(cur), max);
    }
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            let line = l.lines().find(|l| l.starts_with("Max address space"))?;
            line.split_whitespace().nth(3)?.parse::<u64>().ok()
        });
    if let Some(limit) = limit {
        let size = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| kib(&s, "VmSize:"))
            .unwrap_or(0);
        consider(limit.saturating_sub(size), limit);
    }
    best
}

/// [`check_fits`] against what `device` has free now: the CUDA driver's free memory on a GPU,
/// [`host_memory`] on the CPU (nothing to check where neither can be read).
pub fn check_device_fits(device: &Device, what: &str, need: u64) -> Result<()> {
    let free = match device {
        Device::Cpu => host_memory(),
        d => device_memory(d),
    };
    match free {
        Some((free, total)) => check_fits(&device_name(device), what, need, free, total),
        None => Ok(()),
    }
}

/// The driver's out-of-memory error, reworded with the numbers; other errors pass through.
pub fn explain_oom(e: Error, device: &Device, what: &str, need: u64) -> Error {
    let oom = matches!(&e, Error::Candle(c) if c.to_string().contains("OUT_OF_MEMORY"));
    match (oom, device_memory(device)) {
        (true, Some((free, total))) => Error::OutOfMemory {
            device: device_name(device),
            what: what.to_string(),
            need,
            free,
            total,
            hint: format!("the driver refused an allocation ({e})"),
        },
        _ => e,
    }
}

pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Cpu => "cpu (RAM)".into(),
        other => format!("{other:?}"),
    }
}

/// The heap thresholds [`configure_allocator`] sets: allocations under 256 MiB come from the
/// heap, and up to 512 MiB of freed heap stays mapped.
pub const MMAP_THRESHOLD: i32 = 256 << 20;
pub const TRIM_THRESHOLD: i32 = 512 << 20;

/// Keeps the activation buffers of a forward pass (a few MiB, allocated and freed by every op)
/// in glibc's heap instead of fresh `mmap`s: above its default 128 KiB threshold each one was
/// mapped, zero-filled page by page on first touch and unmapped on free, every layer of every
/// step (tiny-kjv prefill of 384 tokens on 2 threads: 256k page faults in 20 runs, ~13,500
/// tok/s; with these thresholds ~18,000-21,000, moe-run bench). Leaves either threshold alone
/// when its `MALLOC_*_` environment variable is set. A no-op off glibc.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
        unsafe {
            if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
            if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_big_is_a_clear_error() {
        assert!(check_fits("cuda:0", "weights", 10, 10, 20).is_ok());
        let e = check_fits(
            "cuda:0",
            "the weights of mixtral-8x7b (bf16)",
            93 << 30,
            22 << 30,
            24 << 30,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cuda:0 out of memory"), "{e}");
        assert!(
            e.contains("93.00 GiB") && e.contains("22.00 GiB") && e.contains("24.00 GiB"),
            "{e}"
        );
        assert!(e.contains("--quant"), "{e}");
        // On the CPU, against the RAM this process may use.
        let (avail, total) = host_memory().expect("/proc/meminfo on Linux");
        assert!(avail > 0 && avail <= total, "{avail} of {total}");
        assert!(check_device_fits(&Device::Cpu, "weights", 1 << 20).is_ok());
        let e = check_device_fits(&Device::Cpu, "weights", u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cpu (RAM) out of memory"), "{e}");
    }
}
