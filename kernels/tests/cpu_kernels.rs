//! The CPU expert and linear kernels (`moe_kernels::cpu`) against an independent f64 reference on the
//! dequantized weights: every weight format (f32, bf16, f16, INT8, INT4 in groups of 16/32/64/128, MXFP4), odd
//! shapes (K not a multiple of the vector width or of the group, one row, experts without tokens, every
//! expert used, more rows per expert than one kernel pass takes), on this CPU's SIMD level and on the
//! portable fallback. No timing here: speed lives in `benches/` and `moe-run bench`.

use candle_core::{DType, Device, Tensor};
use moe_kernels::cpu::{
    linear_cpu, moe_experts_cpu, moe_experts_cpu_with, Activation, Epilogue, Level, WeightRef,
};
use moe_kernels::qformat::{dequantize_tensors, quantize_rows, QFormat};

struct Rng(u64);
impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.f32() + 1.0) * 0.5 * n as f32) as usize % n
    }
}

#[derive(Clone, Copy, Debug)]
enum Fmt {
    F32,
    Bf16,
    F16,
    Q(QFormat),
}

const FORMATS: [Fmt; 9] = [
    Fmt::F32,
    Fmt::Bf16,
    Fmt::F16,
    Fmt::Q(QFormat::Int8),
    Fmt::Q(QFormat::Int4 { group: 16 }),
    Fmt::Q(QFormat::Int4 { group: 32 }),
    Fmt::Q(QFormat::Int4 { group: 64 }),
    Fmt::Q(QFormat::Int4 { group: 128 }),
    Fmt::Q(QFormat::Mxfp4),
];

/// A weight `[rows, k]` (`dims` = its logical dims) in `fmt`, and the f32 values the kernels must use.
struct W {
    dense: Option<Tensor>,
    q: Option<(Tensor, Tensor, QFormat)>,
    values: Vec<f32>,
}

impl W {
    fn new(fmt: Fmt, w: &[f32], dims: &[usize]) -> W {
        let k = *dims.last().unwrap();
        let rows = w.len() / k;
        let dense = |dt: DType| {
            let t = Tensor::from_slice(w, dims, &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let values = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            W {
                dense: Some(t),
                q: None,
                values,
            }
        };
        match fmt {
            Fmt::F32 => dense(DType::F32),
            Fmt::Bf16 => dense(DType::BF16),
            Fmt::F16 => dense(DType::F16),
            Fmt::Q(f) => {
                let kb = f.row_bytes(k);
                let (q, p) = quantize_rows(f, &w[..rows * k], k);
                let mut qd = dims[..dims.len() - 1].to_vec();
                let mut pd = qd.clone();
                qd.push(kb);
                pd.extend(f.params_shape(k));
                let qt = Tensor::from_vec(q, qd, &Device::Cpu).unwrap();
                let pt = p.to_tensor(&pd, &Device::Cpu).unwrap();
                let values = dequantize_tensors(f, &qt, &pt, k).unwrap();
                W {
                    dense: None,
                    q: Some((qt, pt, f)),
                    values,
                }
            }
        }
    }

    fn r(&self) -> WeightRef<'_> {
        match (&self.dense, &self.q) {
            (Some(t), _) => WeightRef::Dense(t),
            (None, Some((q, p, f))) => WeightRef::Quant {
                qweight: q,
                params: p,
                fmt: *f,
            },
            _ => unreachable!(),
        }
    }
}

fn levels() -> Vec<Level> {
    let mut v = vec![Level::Portable];
    if Level::detect() != Level::Portable {
        v.extend([Level::detect(), Level::Avx2Q8]);
    }
    v
}

/// Int8 activations (per block of 32, llama.cpp's q8 scheme) against the f64 reference on f32
/// activations: measured max nmse 1.4e-4 over the expert cases (two quantized stages: x into
/// gate/up, the SwiGLU output into down; rounding of 1/254 of a block's largest value); budget 5e-4.
const NMSE_Q8: f64 = 5e-4;

fn budget(level: Level, fmt: Fmt) -> f64 {
    match (level, fmt) {
        (Level::Avx2Q8, Fmt::Q(_)) => NMSE_Q8,
        _ => NMSE,
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn nmse(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum::<f64>().max(1e-30);
    num / den
}

/// Budget: f32 accumulation against f64 over the same weights (measured ~1e-14; INT4's group form
/// `s (sum x q - z X)` a little more).
const NMSE: f64 = 1e-10;

#[test]
fn experts_match_the_f64_reference_in_every_format() {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    // (tokens, top-k, experts, H, F, pool of experts used)
    let cases = [
        (1usize, 2usize, 8usize, 256usize, 96usize, 8usize),
        (1, 1, 4, 33, 37, 4),
        (3, 2, 8, 100, 64, 3),
        (7, 2, 6, 128, 70, 6),
        (13, 4, 5, 200, 48, 5),
        (9, 8, 8, 64, 32, 8),
        // Prefill: 16+ rows per expert take the dequantize + GEMM path, next to an expert below it.
        (40, 2, 5, 96, 40, 4),
        (33, 3, 3, 130, 50, 3),
        // gpt-oss-like routing (top-4 of 16), K = 288 = 9 groups of 32 (an odd count: the q8 kernels'
        // unpaired last block).
        (2, 4, 16, 288, 96, 16),
    ];
    for &(t, k_top, e, h, f, pool) in &cases {
        let x = rng.vec(t * h, 1.0);
        let wg = rng.vec(e * 2 * f * h, 1.0 / (h as f32).sqrt());
        let wd = rng.vec(e * h * f, 1.0 / (f as f32).sqrt());
        // Routing: k distinct experts per token from the first `pool` (so pool < e leaves experts idle).
        let mut per_expert: Vec<Vec<u32>> = vec![vec![]; e];
        for tok in 0..t {
            let mut chosen = vec![];
            while chosen.len() < k_top.min(pool) {
                let c = rng.below(pool);
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            for c in chosen {
                per_expert[c].push(tok as u32);
            }
        }
        let mut offsets = vec![0u32];
        let mut row_token = vec![];
        for rows in &per_expert {
            row_token.extend(rows);
            offsets.push(row_token.len() as u32);
        }
        for fmt in FORMATS {
            if let Fmt::Q(QFormat::Int4 { group }) = fmt {
                if group > h.max(f) * 2 {
                    continue;
                }
            }
            let gu = W::new(fmt, &wg, &[e, 2 * f, h]);
            let dn = W::new(fmt, &wd, &[e, h, f]);
            // f64 reference on the weights' exact values.
            let mut want = vec![0f64; row_token.len() * h];
            for ex in 0..e {
                for r in offsets[ex] as usize..offsets[ex + 1] as usize {
                    let xr = &x[row_token[r] as usize * h..][..h];
                    let act: Vec<f32> = (0..f)
                        .map(|j| {
                            let g = dot(xr, &gu.values[(ex * 2 * f + j) * h..][..h]);
                            let u = dot(xr, &gu.values[(ex * 2 * f + f + j) * h..][..h]);
                            (g / (1.0 + (-g).exp()) * u) as f32
                        })
                        .collect();
                    for c in 0..h {
                        want[r * h + c] = dot(&act, &dn.values[(ex * h + c) * f..][..f]);
                    }
                }
            }
            let xt = Tensor::from_slice(&x, (t, h), &Device::Cpu).unwrap();
            for level in levels() {
                let y = moe_experts_cpu(level, &xt, &row_token, &offsets, gu.r(), dn.r()).unwrap();
                assert_eq!(y.dims(), &[row_token.len(), h]);
                let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                let e_ = nmse(&got, &want);
                assert!(
                    e_ < budget(level, fmt),
                    "{fmt:?} {level:?} T={t} k={k_top} E={e} H={h} F={f}: nmse {e_:e}"
                );
            }
            // gpt-oss's epilogue: biases after both projections, indexed through global expert ids
            // (reversed here, as a placed share's would be), and the clamped SwiGLU with a limit
            // these activations cross.
            let (alpha, limit) = (1.702f32, 0.8f32);
            let bg = rng.vec(e * 2 * f, 0.5);
            let bd = rng.vec(e * h, 0.5);
            let ids: Vec<usize> = (0..e).rev().collect();
            let mut want = vec![0f64; row_token.len() * h];
            for ex in 0..e {
                let gx = ids[ex];
                for r in offsets[ex] as usize..offsets[ex + 1] as usize {
                    let xr = &x[row_token[r] as usize * h..][..h];
                    let act: Vec<f32> = (0..f)
                        .map(|j| {
                            let g = dot(xr, &gu.values[(ex * 2 * f + j) * h..][..h])
                                + bg[gx * 2 * f + j] as f64;
                            let u = dot(xr, &gu.values[(ex * 2 * f + f + j) * h..][..h])
                                + bg[gx * 2 * f + f + j] as f64;
                            let (l, a) = (limit as f64, alpha as f64);
                            let g = g.min(l);
                            ((u.clamp(-l, l) + 1.0) * g / (1.0 + (-a * g).exp())) as f32
                        })
                        .collect();
                    for c in 0..h {
                        want[r * h + c] =
                            dot(&act, &dn.values[(ex * h + c) * f..][..f]) + bd[gx * h + c] as f64;
                    }
                }
            }
            let ep = Epilogue {
                act: Activation::ClampedSwiGlu { alpha, limit },
                gate_up_bias: Some(&bg),
                down_bias: Some(&bd),
                experts: Some(&ids),
            };
            for level in levels() {
                let y = moe_experts_cpu_with(level, &xt, &row_token, &offsets, gu.r(), dn.r(), &ep)
                    .unwrap();
                let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                let e_ = nmse(&got, &want);
                assert!(
                    e_ < budget(level, fmt),
                    "epilogue {fmt:?} {level:?} T={t} k={k_top} E={e} H={h} F={f}: nmse {e_:e}"
                );
            }
        }
    }
}

#[test]
fn linear_matches_the_f64_reference_in_every_format_and_activation_dtype() {
    let mut rng = Rng(7);
    for &(m, n, k) in &[
        (1usize, 65usize, 256usize),
        (5, 31, 100),
        (9, 16, 33),
        (2, 130, 512),
        // 16+ rows: the dequantize + GEMM path.
        (17, 65, 256),
        (24, 70, 100),
    ] {
        let x = rng.vec(m * k, 1.0);
        let w = rng.vec(n * k, 1.0 / (k as f32).sqrt());
        for fmt in FORMATS {
            let wt = W::new(fmt, &w, &[n, k]);
            for dt in [DType::F32, DType::BF16] {
                let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let xv: Vec<f32> = xt
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want: Vec<f64> = (0..m * n)
                    .map(|i| dot(&xv[(i / n) * k..][..k], &wt.values[(i % n) * k..][..k]))
                    .collect();
                for level in levels() {
                    let y = linear_cpu(level, &xt, wt.r(), n).unwrap();
                    assert_eq!((y.dims(), y.dtype()), (&[m, n][..], dt));
                    let got: Vec<f32> = y
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    // bf16 outputs: one rounding of each result (relative 2^-9).
                    let budget = if dt == DType::F32 {
                        budget(level, fmt)
                    } else {
                        1e-5f64.max(budget(level, fmt))
                    };
                    let e_ = nmse(&got, &want);
                    assert!(
                        e_ < budget,
                        "{fmt:?} {dt:?} {level:?} M={m} N={n} K={k}: nmse {e_:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
    let gu = Tensor::zeros((2, 6, 8), DType::F32, &Device::Cpu).unwrap();
    let dn = Tensor::zeros((2, 8, 3), DType::F32, &Device::Cpu).unwrap();
    let ok = moe_experts_cpu(
        Level::Portable,
        &x,
        &[0, 1],
        &[0, 1, 2],
        WeightRef::Dense(&gu),
        WeightRef::Dense(&dn),
    );
    assert!(ok.is_ok());
    // A token id past x, offsets that do not end at the row count, a wrong expert width.
    for (rows, offs) in [
        (vec![0u32, 5], vec![0u32, 1, 2]),
        (vec![0, 1], vec![0, 1, 3]),
    ] {
        let e = moe_experts_cpu(
            Level::Portable,
            &x,
            &rows,
            &offs,
            WeightRef::Dense(&gu),
            WeightRef::Dense(&dn),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("moe_experts_cpu"), "{e}");
    }
    let dn_bad = Tensor::zeros((2, 8, 4), DType::F32, &Device::Cpu).unwrap();
    let e = moe_experts_cpu(
        Level::Portable,
        &x,
        &[0, 1],
        &[0, 1, 2],
        WeightRef::Dense(&gu),
        WeightRef::Dense(&dn_bad),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("down") || e.contains("shapes"), "{e}");
}
