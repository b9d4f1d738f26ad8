//! A small table of GPUs: memory bandwidth, memory, dense tensor-core peaks.
//!
//! Every peak is DENSE (NVIDIA's sheets lead with 2:4-structured-sparsity figures, exactly
//! twice these) and, for 16-bit, with FP32 ACCUMULATE (what a matmul in bf16 uses; GeForce
//! cards run FP16-accumulate at twice that rate, datacenter parts at the same rate).
//! Bandwidth is in GB/s (1e9 B/s). Memory is the nominal size in GiB; the driver reports a
//! little less (e.g. 24564 MiB on an RTX 4090, 81559 MiB on an H100 SXM).
//!
//! Sources (spec sheets / whitepapers):
//! - RTX 4090: NVIDIA Ada Lovelace architecture whitepaper (v2.1), GeForce RTX 4090 column:
//!   1008 GB/s, 24 GB GDDR6X; BF16 tensor w/ FP32 acc 165.2 TFLOPS (330.4 sparse); TF32 82.6;
//!   INT8 660.6 TOPS (1321.2 sparse).
//! - RTX 3090: NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090 column: 936 GB/s, 24 GB
//!   GDDR6X; BF16 w/ FP32 acc 71 TFLOPS (142 sparse); TF32 35.6; INT8 284 TOPS (568 sparse).
//! - A100 80GB SXM: NVIDIA A100 datasheet: 2039 GB/s HBM2e, 80 GB; BF16 312 TFLOPS (624
//!   sparse); TF32 156; INT8 624 TOPS (1248 sparse).
//! - H100 SXM: NVIDIA H100 datasheet: 3.35 TB/s HBM3, 80 GB; BF16 989 TFLOPS (1979 sparse);
//!   TF32 494.7; INT8 1979 TOPS (3958 sparse).
//! - H100 PCIe: NVIDIA H100 datasheet: 2.0 TB/s HBM2e, 80 GB; BF16 756 TFLOPS (1513 sparse);
//!   TF32 378; INT8 1513 TOPS (3026 sparse).
//! - H200 SXM: NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 141 GB; compute as H100 SXM.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gpu {
    pub name: String,
    /// Names accepted by `--gpu` (lowercase, no spaces).
    #[serde(skip)]
    pub aliases: &'static [&'static str],
    /// DRAM bandwidth, GB/s (1e9 bytes per second).
    pub bandwidth_gb_s: f64,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Dense BF16 tensor peak with FP32 accumulate, TFLOPS; `None` if unknown (custom GPU).
    pub bf16_tflops: Option<f64>,
    /// Dense TF32 tensor peak, TFLOPS (what fp32 weights run at on tensor cores).
    pub tf32_tflops: Option<f64>,
    /// Dense INT8 tensor peak, TOPS (reachable only by a W8A8 kernel).
    pub int8_tops: Option<f64>,
}

impl Gpu {
    pub fn memory_bytes(&self) -> f64 {
        self.memory_gib * (1u64 << 30) as f64
    }

    pub fn bandwidth_bytes_s(&self) -> f64 {
        self.bandwidth_gb_s * 1e9
    }

    /// A GPU given only by `--bandwidth GB/s --memory GiB [--tflops BF16]`.
    pub fn custom(bandwidth_gb_s: f64, memory_gib: f64, bf16_tflops: Option<f64>) -> Gpu {
        Gpu {
            name: "custom GPU".to_string(),
            aliases: &[],
            bandwidth_gb_s,
            memory_gib,
            bf16_tflops,
            tf32_tflops: bf16_tflops.map(|t| t / 2.0),
            int8_tops: None,
        }
    }
}

struct Spec {
    name: &'static str,
    aliases: &'static [&'static str],
    bandwidth_gb_s: f64,
    memory_gib: f64,
    bf16: f64,
    tf32: f64,
    int8: f64,
}

/// The built-in GPUs (values and sources in the module doc).
static SPECS: &[Spec] = &[
    Spec {
        name: "RTX 4090",
        aliases: &["rtx4090", "4090"],
        bandwidth_gb_s: 1008.0,
        memory_gib: 24.0,
        bf16: 165.2,
        tf32: 82.6,
        int8: 660.6,
    },
    Spec {
        name: "RTX 3090",
        aliases: &["rtx3090", "3090"],
        bandwidth_gb_s: 936.0,
        memory_gib: 24.0,
        bf16: 71.0,
        tf32: 35.6,
        int8: 284.0,
    },
    Spec {
        name: "A100-80GB SXM",
        aliases: &["a100", "a100-80gb", "a100-80g", "a100-sxm"],
        bandwidth_gb_s: 2039.0,
        memory_gib: 80.0,
        bf16: 312.0,
        tf32: 156.0,
        int8: 624.0,
    },
    Spec {
        name: "H100 SXM",
        aliases: &["h100", "h100-sxm", "h100sxm"],
        bandwidth_gb_s: 3350.0,
        memory_gib: 80.0,
        bf16: 989.0,
        tf32: 494.7,
        int8: 1979.0,
    },
    Spec {
        name: "H100 PCIe",
        aliases: &["h100-pcie", "h100pcie"],
        bandwidth_gb_s: 2000.0,
        memory_gib: 80.0,
        bf16: 756.0,
        tf32: 378.0,
        int8: 1513.0,
    },
    Spec {
        name: "H200 SXM",
        aliases: &["h200", "h200-sxm"],
        bandwidth_gb_s: 4800.0,
        memory_gib: 141.0,
        bf16: 989.0,
        tf32: 494.7,
        int8: 1979.0,
    },
];

/// Every built-in GPU, in table order.
pub fn builtin_gpus() -> Vec<Gpu> {
    SPECS
        .iter()
        .map(|s| Gpu {
            name: s.name.to_string(),
            aliases: s.aliases,
            bandwidth_gb_s: s.bandwidth_gb_s,
            memory_gib: s.memory_gib,
            bf16_tflops: Some(s.bf16),
            tf32_tflops: Some(s.tf32),
            int8_tops: Some(s.int8),
        })
        .collect()
}

/// A built-in GPU by name or alias, ignoring case, spaces, `-` and `_`.
pub fn find_gpu(name: &str) -> Option<Gpu> {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase()
    };
    let want = norm(name);
    builtin_gpus()
        .into_iter()
        .find(|g| norm(&g.name) == want || g.aliases.iter().any(|a| norm(a) == want))
}

/// The names `--gpu` accepts, for error messages.
pub fn gpu_names() -> Vec<&'static str> {
    SPECS.iter().map(|s| s.aliases[0]).collect()
}
