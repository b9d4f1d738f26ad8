//! The one execution-path selector. Every choice of which implementation runs an op of a forward
//! pass is made here, by pure functions of the model's device, one environment override read once
//! per model, and the op's shape: candle's composite ops or our kernels, the MoE block's routing
//! on the device or the host, the fused norms, decode attention, the experts' GEMV or GEMM
//! variant, MLA's absorbed or expanded form, and on the CPU the SIMD level of the CPU kernels
//! (`moe_kernels::cpu`). (The coming hybrid CPU/GPU expert placement adds its per-layer,
//! per-expert "where" to [`PathPlan`].)
//!
//! Override: `MOE_PATH` = a comma-separated list of `kernels|candle`, `gemv|gemm`,
//! `qmma|qgemv|qmatmul-gemv`, `absorbed|expanded`, `simd|q8act|portable|reference` (e.g.
//! `MOE_PATH=kernels,gemm` or `MOE_PATH=portable`); unset or empty keeps every default.

use candle_core::{bail, DType, Device, Result};
use moe_kernels::cpu::Level;
pub use moe_kernels::ExpertPath;
use moe_kernels::{GemvKernel, Router};

use crate::quant::Weight;

/// The environment variable of [`PathPlan::from_env`].
pub const PATH_ENV: &str = "MOE_PATH";

/// Which implementation runs the hot ops of a forward pass: the MoE stages, the decoder layers'
/// RMSNorms (fused with the residual add) and single-token GQA attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecPath {
    /// The moe-kernels ops: routing and dispatch stay on the device (no device-to-host copy inside a
    /// forward pass). On CUDA they launch the hand-written kernels; on the CPU they run the kernels'
    /// plain-Rust references (the specification: exact, but single-threaded).
    Kernels,
    /// candle's composite ops, with MoE routing on the host and one matmul per active expert.
    Candle,
}

/// MLA's two formulations (`model/mla.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlaPath {
    /// W_uk folded into the query and W_uv into the output: the cache is read as latents only.
    Absorbed,
    /// Per-head keys and values materialised with one kv_b_proj matmul.
    Expanded,
}

/// Up to this many new tokens per sequence, MLA takes the absorbed path (decode); more tokens
/// (prefill, compute-bound) take the expanded one.
pub const MLA_ABSORB_MAX_TOKENS: usize = 1;

/// Every path choice of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathPlan {
    pub exec: ExecPath,
    /// The experts' kernel variant when forced; `None` chooses by token count.
    pub expert: Option<ExpertPath>,
    /// MLA's formulation when forced; `None` chooses by token count.
    pub mla: Option<MlaPath>,
    /// Which entries INT4/INT8 GEMVs on the kernel path take: `qmma_*` (tensor cores) where they
    /// apply (the default), else `qgemv_*`; `qgemv` stops at the second, `qmatmul-gemv` takes the
    /// older `qmatmul_*` ones (for timing one against another); applied to the loading thread with
    /// [`moe_kernels::set_gemv_kernel`].
    pub gemv: GemvKernel,
    /// On the CPU's candle path: the instruction set of the CPU expert and linear kernels
    /// (`moe_kernels::cpu`), or `None` for the plain references and candle's own ops
    /// (`MOE_PATH=reference`). Always `None` on a GPU.
    pub cpu: Option<Level>,
    /// The GPU's streaming multiprocessors ([`moe_kernels::gpu_sm_count`]), against which the
    /// quantized experts' GEMV/GEMM choice counts blocks; `None` off CUDA.
    pub sms: Option<usize>,
}

/// Up to this many activation rows, an f32 linear on the CPU takes the CPU GEMV kernel; more
/// take candle's GEMM (bf16, f16 and quantized weights always take the CPU kernels, which read
/// them in place instead of widening the whole weight to f32 on every call).
pub const CPU_F32_LINEAR_MAX_ROWS: usize = 16;

impl PathPlan {
    /// The plan for `device`: kernels on CUDA, candle on the CPU (where candle's threaded GEMM
    /// beats the single-threaded references), unless `env_override` (the value of [`PATH_ENV`])
    /// says otherwise. Pure but for asking the driver for a GPU's SM count.
    pub fn select(device: &Device, env_override: Option<&str>) -> Result<Self> {
        let mut plan = PathPlan {
            exec: if device.is_cpu() {
                ExecPath::Candle
            } else {
                ExecPath::Kernels
            },
            expert: None,
            mla: None,
            cpu: device.is_cpu().then(Level::default_for_cpu),
            gemv: GemvKernel::Qmma,
            sms: moe_kernels::gpu_sm_count(device),
        };
        for word in env_override.unwrap_or("").split(',').map(str::trim) {
            match word {
                "" => {}
                "kernels" => plan.exec = ExecPath::Kernels,
                "candle" => plan.exec = ExecPath::Candle,
                "gemv" => plan.expert = Some(ExpertPath::Gemv),
                "gemm" => plan.expert = Some(ExpertPath::Gemm),
                "qmma" => plan.gemv = GemvKernel::Qmma,
                "qgemv" => plan.gemv = GemvKernel::Qgemv,
                "qmatmul-gemv" => plan.gemv = GemvKernel::Qmatmul,
                "absorbed" => plan.mla = Some(MlaPath::Absorbed),
                "expanded" => plan.mla = Some(MlaPath::Expanded),
                "simd" if device.is_cpu() => plan.cpu = Some(Level::detect()),
                "portable" if device.is_cpu() => plan.cpu = Some(Level::Portable),
                "q8act" if device.is_cpu() => plan.cpu = Some(Level::default_for_cpu()),
                "reference" => plan.cpu = None,
                "simd" | "portable" | "q8act" => {}
                other => bail!(
                    "{PATH_ENV}: unknown word {other:?}; use a comma-separated list of \
                     kernels|candle, gemv|gemm, qmma|qgemv|qmatmul-gemv, absorbed|expanded, \
                     simd|q8act|portable|reference"
                ),
            }
        }
        Ok(plan)
    }

    /// [`PathPlan::select`] with [`PATH_ENV`] as it is now (read once per model).
    pub fn from_env(device: &Device) -> Result<Self> {
        Self::select(device, std::env::var(PATH_ENV).ok().as_deref())
    }

    /// Whether a MoE block routes and dispatches on the device: on the kernel path, within the
    /// route kernel's limits (E <= 256, k <= 8, <= 32 groups); beyond them the block routes on
    /// the host (one device-to-host read per layer) rather than failing.
    pub fn route_on_device(&self, router: Router, num_experts: usize, top_k: usize) -> bool {
        self.exec == ExecPath::Kernels
            && moe_kernels::route::route_kernel_supports(router, num_experts, top_k)
    }

    /// Whether a decoder norm runs as the (fused add+) RMSNorm kernel: on the kernel path, for
    /// an RMSNorm whose weight has the activations' dtype.
    pub fn rms_norm_kernel(&self, is_rms: bool, weight: DType, x: DType) -> bool {
        self.exec == ExecPath::Kernels && is_rms && weight == x
    }

    /// Whether q/k take the fused per-head QK-norm + RoPE kernel (on the kernel path, for the
    /// projections RoPE applies to).
    pub fn qk_norm_rope_kernel(&self, rope_applies: bool) -> bool {
        self.exec == ExecPath::Kernels && rope_applies
    }

    /// Whether GQA attention of `t` new tokens with head dim `head_dim` runs the flash-decoding
    /// kernel over the cache: single-token steps on the kernel path, within its head-dim limit.
    pub fn decode_attention_kernel(&self, t: usize, head_dim: usize) -> bool {
        self.exec == ExecPath::Kernels
            && t == 1
            && head_dim <= moe_kernels::attention::DECODE_ATTN_MAX_D
    }

    /// The CPU kernels' level for a MoE block's experts: on the CPU's candle path, unless the
    /// references are forced.
    pub fn cpu_experts(&self) -> Option<Level> {
        self.cpu.filter(|_| self.exec == ExecPath::Candle)
    }

    /// The CPU kernels' level for a linear with `weight` over `rows` activation rows: bf16, f16
    /// and quantized weights always, f32 up to [`CPU_F32_LINEAR_MAX_ROWS`] rows (candle's GEMM
    /// beyond).
    pub fn cpu_linear(&self, weight: &Weight, rows: usize) -> Option<Level> {
        let dense_f32 = matches!(weight, Weight::Dense(w) if w.dtype() == DType::F32);
        self.cpu_experts()
            .filter(|_| !dense_f32 || rows <= CPU_F32_LINEAR_MAX_ROWS)
    }

    /// Whether MLA runs absorbed for `t` new tokens per sequence.
    pub fn mla_absorbed(&self, t: usize) -> bool {
        match self.mla {
            Some(p) => p == MlaPath::Absorbed,
            None => t <= MLA_ABSORB_MAX_TOKENS,
        }
    }

    /// The experts' kernel variant for `tokens` tokens with top-`top_k` over `num_experts`: the
    /// forced one, else GEMV for decode and tiled GEMM for prefill ([`moe_kernels::expert_path`]'s
    /// thresholds), chosen on the host from the token count alone (no sync).
    pub fn expert_path(&self, tokens: usize, top_k: usize, num_experts: usize) -> ExpertPath {
        self.expert
            .unwrap_or_else(|| moe_kernels::expert_path_for(tokens, top_k, num_experts))
    }

    /// [`Self::expert_path`] for experts with these weights under `dtype` activations: quantized
    /// experts whose GEMV entries are the tensor-core `qmma_*` ones (INT4/INT8/MXFP4, bf16/f16,
    /// sm_80+) keep the GEMV while experts average one 8-row chunk (or while `qmma`'s GEMM would
    /// leave SMs idle) and take that GEMM past it, unless a path is forced
    /// ([`moe_kernels::qexpert_path_for`] says why).
    pub fn experts_path(
        &self,
        tokens: usize,
        top_k: usize,
        num_experts: usize,
        (gate_up, down): (&Weight, &Weight),
        dtype: DType,
    ) -> ExpertPath {
        match (self.expert, gate_up, down) {
            (None, Weight::Quant(gu), Weight::Quant(dn)) => {
                // (inputs, output rows) of each projection: [.., N, K] logical shapes.
                let kn = |s: &[usize]| match s {
                    [.., n, k] => (*k, *n),
                    _ => (0, 0),
                };
                let projections = [kn(&gu.shape), kn(&dn.shape)];
                moe_kernels::qexpert_path_for(
                    tokens,
                    top_k,
                    num_experts,
                    gu.fmt,
                    dtype,
                    &projections,
                    self.sms,
                )
            }
            _ => self.expert_path(tokens, top_k, num_experts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let cpu = PathPlan::select(&Device::Cpu, None).unwrap();
        assert_eq!(
            cpu,
            PathPlan {
                exec: ExecPath::Candle,
                expert: None,
                mla: None,
                cpu: Some(Level::default_for_cpu()),
                gemv: GemvKernel::Qmma,
                sms: None,
            }
        );
        assert_eq!(cpu.cpu_experts(), Some(Level::default_for_cpu()));
        let simd = PathPlan::select(&Device::Cpu, Some("simd")).unwrap();
        assert_eq!(
            simd.cpu_experts(),
            Some(Level::detect()),
            "exact f32 activations"
        );
        let portable = PathPlan::select(&Device::Cpu, Some("portable")).unwrap();
        assert_eq!(portable.cpu_experts(), Some(Level::Portable));
        let reference = PathPlan::select(&Device::Cpu, Some("reference")).unwrap();
        assert_eq!(reference.cpu_experts(), None);
        // The CPU kernels belong to the CPU's candle path: the kernel path keeps its references.
        let kern = PathPlan::select(&Device::Cpu, Some("kernels")).unwrap();
        assert_eq!(kern.cpu_experts(), None);
        let f32w =
            Weight::Dense(candle_core::Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap());
        let bf16w =
            Weight::Dense(candle_core::Tensor::zeros((4, 4), DType::BF16, &Device::Cpu).unwrap());
        assert!(cpu.cpu_linear(&f32w, CPU_F32_LINEAR_MAX_ROWS).is_some());
        assert!(
            cpu.cpu_linear(&f32w, CPU_F32_LINEAR_MAX_ROWS + 1).is_none(),
            "candle's GEMM"
        );
        assert!(
            cpu.cpu_linear(&bf16w, 4096).is_some(),
            "bf16 is never widened"
        );
        assert!(reference.cpu_linear(&bf16w, 1).is_none());
        let old = PathPlan::select(&Device::Cpu, Some("kernels,qmatmul-gemv")).unwrap();
        assert_eq!(old.gemv, GemvKernel::Qmatmul);
        let qgemv = PathPlan::select(&Device::Cpu, Some("qgemv")).unwrap();
        assert_eq!(qgemv.gemv, GemvKernel::Qgemv);
        let p = PathPlan::select(&Device::Cpu, Some(" kernels , gemm,absorbed ")).unwrap();
        assert_eq!(p.exec, ExecPath::Kernels);
        assert_eq!(p.expert_path(1, 1, 8), ExpertPath::Gemm);
        assert!(p.mla_absorbed(100));
        assert_eq!(PathPlan::select(&Device::Cpu, Some("")).unwrap(), cpu);
        let g = PathPlan::select(&Device::Cpu, Some(" gemv ")).unwrap();
        assert_eq!(
            g.expert_path(513, 4, 16),
            ExpertPath::Gemv,
            "forced over the threshold"
        );
        assert!(PathPlan::select(&Device::Cpu, Some("tensorcore")).is_err());
        let e = PathPlan::select(&Device::Cpu, Some("kernels,cublas"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MOE_PATH") && e.contains("cublas"), "{e}");
    }

    #[test]
    fn each_choice_and_its_threshold() {
        let k = PathPlan::select(&Device::Cpu, Some("kernels")).unwrap();
        let c = PathPlan::select(&Device::Cpu, Some("candle")).unwrap();
        let softmax = Router::Softmax { norm_p: Some(1.0) };
        assert!(k.route_on_device(softmax, 8, 2) && !c.route_on_device(softmax, 8, 2));
        assert!(
            !k.route_on_device(softmax, 257, 2),
            "beyond the route kernel: host"
        );
        assert!(!k.route_on_device(softmax, 16, 9));
        assert!(k.rms_norm_kernel(true, DType::F32, DType::F32));
        assert!(
            !k.rms_norm_kernel(true, DType::F32, DType::BF16),
            "weight dtype differs"
        );
        assert!(
            !k.rms_norm_kernel(false, DType::F32, DType::F32),
            "LayerNorm"
        );
        assert!(!c.rms_norm_kernel(true, DType::F32, DType::F32));
        assert!(k.qk_norm_rope_kernel(true) && !k.qk_norm_rope_kernel(false));
        let max_d = moe_kernels::attention::DECODE_ATTN_MAX_D;
        assert!(k.decode_attention_kernel(1, max_d));
        assert!(!k.decode_attention_kernel(1, max_d + 1) && !k.decode_attention_kernel(2, 64));
        assert!(!c.decode_attention_kernel(1, 64));
        assert!(k.mla_absorbed(1) && !k.mla_absorbed(2));
        let e = PathPlan::select(&Device::Cpu, Some("expanded")).unwrap();
        assert!(!e.mla_absorbed(1));
        assert_eq!(k.expert_path(1, 2, 8), ExpertPath::Gemv, "decode");
        assert_eq!(k.expert_path(512, 2, 8), ExpertPath::Gemm, "prefill");
        assert_eq!(
            k.expert_path(64, 8, 256),
            ExpertPath::Gemv,
            "E=256 top-8 at 64 tokens"
        );
    }

    /// Quantized experts whose GEMV is `qmma` (INT4/INT8, bf16/f16) keep the GEMV while experts
    /// average up to 8 rows (past the dense experts' 4) or the GEMM would have too few blocks, then
    /// take the GEMM; f32 activations, dense experts and a forced path keep the token-count choice.
    #[test]
    fn quantized_experts_on_qmma_keep_the_gemv_for_one_chunk() {
        use crate::quant::QuantTensor;
        use moe_kernels::QFormat;
        let dev = Device::Cpu;
        let w = |n: usize, k: usize| candle_core::Tensor::zeros((4, n, k), DType::F32, &dev);
        let q = |t: candle_core::Tensor, fmt| {
            Weight::Quant(QuantTensor::quantize(&t, fmt, &dev).unwrap())
        };
        let k = PathPlan::select(&dev, Some("kernels")).unwrap();
        for fmt in [QFormat::Int8, QFormat::Int4 { group: 32 }] {
            let (gu, dn) = (q(w(64, 32).unwrap(), fmt), q(w(32, 32).unwrap(), fmt));
            for dtype in [DType::BF16, DType::F16] {
                // 12 tokens, top-2 of 4: 6 rows per expert on average (the dense experts' GEMM).
                assert_eq!(
                    k.experts_path(12, 2, 4, (&gu, &dn), dtype),
                    ExpertPath::Gemv
                );
                // 64 output rows are one GEMM block per 32-row tile: 512 tokens give 32 blocks,
                // too few for a GPU (the GEMV), 2048 give 128.
                assert_eq!(
                    k.experts_path(512, 2, 4, (&gu, &dn), dtype),
                    ExpertPath::Gemv
                );
                assert_eq!(
                    k.experts_path(2048, 2, 4, (&gu, &dn), dtype),
                    ExpertPath::Gemm
                );
            }
            assert_eq!(
                k.experts_path(12, 2, 4, (&gu, &dn), DType::F32),
                ExpertPath::Gemm
            );
            let forced = PathPlan::select(&dev, Some("kernels,gemm")).unwrap();
            assert_eq!(
                forced.experts_path(1, 2, 4, (&gu, &dn), DType::BF16),
                ExpertPath::Gemm
            );
        }
        // INT4 g16 has no qmma entry; a dense expert takes the dense experts' choice.
        let g16 = QFormat::Int4 { group: 16 };
        let (gu, dn) = (q(w(64, 32).unwrap(), g16), q(w(32, 32).unwrap(), g16));
        assert_eq!(
            k.experts_path(12, 2, 4, (&gu, &dn), DType::BF16),
            ExpertPath::Gemm
        );
        let dense = Weight::Dense(w(64, 32).unwrap());
        assert_eq!(
            k.experts_path(12, 2, 4, (&dense, &dense), DType::BF16),
            ExpertPath::Gemm
        );
    }
}
