//! The batch-1 decode step as a CUDA graph (`--cuda-graph`): one replay per decoded token instead of
//! every kernel launch of the step.
//!
//! A decode step on the kernel path reads everything that changes between steps from device memory:
//! the token id from a tensor this decoder owns, the position, key range and cache slot of every
//! layer from the cache's step table (`KvCache::step_table`), so the step's launches are the same at
//! every position up to the attention's key bound (`Model::step_bounds`; tested on the emulator by
//! recording the launches of consecutive steps). One graph is captured per distinct set of bounds
//! (a power of two of keys per layer, so a handful per generation):
//! 1. the first step with new bounds runs eagerly with candle's host-to-device cache on, which loads
//!    every module and caches every small upload the step makes;
//! 2. the next step with those bounds runs eagerly (its logits are the step's answer), is captured on
//!    candle's stream (nothing runs during a capture), and the graph is replayed once for the same
//!    step: its logits must equal the eager ones (the replay rewrites the same cache slot with the
//!    same values), else graphs are turned off;
//! 3. every later step with those bounds writes the token id and the step table, replays the graph and
//!    reads the logits from the graph's output tensor.
//!
//! When the model's step cannot be replayed ([`Model::graph_blocker`]: the candle path, MLA, experts
//! in host memory, host routing, ...), on a device other than CUDA, or when a capture or its check
//! fails, the decoder says why once on stderr and runs every step eagerly.
//!
//! NOT YET RUN ON A GPU: this machine has none; the CUDA part is compile-checked only.

use candle_core::{Result, Tensor};

use crate::model::kv_cache::KvCache;
use crate::model::Model;

/// Decodes one token per step at batch 1, replaying captured CUDA graphs where it can.
pub struct GraphDecoder {
    /// Why steps run eagerly, once said; `None` while graphs are on.
    off: Option<String>,
    #[cfg(feature = "cuda")]
    cuda: Option<cuda::State>,
    /// Graph replays so far (each counted as one kernel launch by moe-kernels' counter).
    pub replays: u64,
    /// The nodes of the last graph captured: every launch and copy of one eager decode step,
    /// candle's and cuBLAS's included (what moe-kernels' own counter cannot see).
    pub nodes: Option<NodeCensus>,
}

/// A captured graph's nodes by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeCensus {
    pub kernels: usize,
    /// Memory copies and sets.
    pub copies: usize,
    /// Stream-ordered allocations and frees.
    pub allocs: usize,
    pub other: usize,
}

impl GraphDecoder {
    /// A decoder for `model`; graphs are off (with the reason on stderr) where they cannot work.
    pub fn new(model: &Model) -> Self {
        let why = if !model.device().is_cuda() {
            Some("CUDA graphs need a CUDA device".to_string())
        } else {
            model.graph_blocker()
        };
        let mut d = GraphDecoder {
            off: None,
            #[cfg(feature = "cuda")]
            cuda: None,
            replays: 0,
            nodes: None,
        };
        match why {
            Some(w) => d.turn_off(w),
            None => d.start(model),
        }
        d
    }

    /// Whether steps are replayed (no reason to run them eagerly so far).
    pub fn active(&self) -> bool {
        self.off.is_none()
    }

    fn turn_off(&mut self, why: String) {
        if self.off.is_none() {
            eprintln!("moe-run: CUDA graphs off ({why}); decoding with eager launches");
            self.off = Some(why);
        }
        #[cfg(feature = "cuda")]
        {
            self.cuda = None;
        }
    }

    #[cfg(feature = "cuda")]
    fn start(&mut self, model: &Model) {
        match cuda::State::new(model) {
            Ok(s) => self.cuda = Some(s),
            Err(e) => self.turn_off(format!("cannot set up: {e}")),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn start(&mut self, _model: &Model) {
        self.turn_off("this build has no CUDA".into());
    }

    /// The decode step of token `id` at `cache.len()`: `[1, 1, V]` f32 logits, the cache advanced by
    /// one. A replay's logits live in the graph's output tensor until the next step.
    pub fn step(&mut self, model: &Model, cache: &mut KvCache, id: u32) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(state) = self.cuda.as_mut() {
            return match state.step(model, cache, id)? {
                cuda::Outcome::Logits(l, replayed) => {
                    if replayed {
                        self.replays += 1;
                        moe_kernels::launch::count_graph_replay();
                    }
                    if let Some(n) = state.census.take() {
                        self.nodes = Some(n);
                    }
                    Ok(l)
                }
                cuda::Outcome::Off(l, why) => {
                    self.turn_off(why);
                    Ok(l)
                }
            };
        }
        let ids = Tensor::new(&[id], model.device())?.unsqueeze(0)?;
        model.forward(&ids, cache, false, None)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::collections::HashMap;

    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{DType, Device, Result, Tensor};

    use crate::model::host;
    use crate::model::kv_cache::KvCache;
    use crate::model::Model;

    /// A replay's logits may differ from the eager step's by no more than this share of the largest
    /// |logit| (the same kernels on the same inputs: in practice identical).
    const REPLAY_TOLERANCE: f32 = 1e-3;

    pub enum Outcome {
        /// The step's logits; `true` when a graph replay computed them.
        Logits(Tensor, bool),
        /// The step's logits (computed eagerly), and why graphs are now off.
        Off(Tensor, String),
    }

    enum Slot {
        /// One eager step with these bounds has run (modules loaded, uploads cached).
        Warm,
        Ready(CudaGraph),
    }

    pub struct State {
        dev: CudaDevice,
        /// The token id the graphs read, `[1, 1]` u32, rewritten before each step.
        ids: Tensor,
        /// The graphs' output, `[1, 1, V]` f32 (allocated at the first capture).
        logits: Option<Tensor>,
        graphs: HashMap<Vec<usize>, Slot>,
        /// The census of the graph captured last, until the decoder takes it.
        pub census: Option<super::NodeCensus>,
    }

    impl State {
        pub fn new(model: &Model) -> Result<Self> {
            let Device::Cuda(dev) = model.device() else {
                candle_core::bail!("not a CUDA device")
            };
            Ok(State {
                dev: dev.clone(),
                ids: Tensor::zeros((1, 1), DType::U32, model.device())?,
                logits: None,
                graphs: HashMap::new(),
                census: None,
            })
        }

        fn eager(&self, model: &Model, cache: &mut KvCache) -> Result<Tensor> {
            let _cache_uploads = self.dev.enable_cuda_graph_htod_cache();
            model.forward(&self.ids, cache, false, None)
        }

        pub fn step(&mut self, model: &Model, cache: &mut KvCache, id: u32) -> Result<Outcome> {
            let token = Tensor::new(&[[id]], model.device())?;
            self.ids.slice_set(&token, 0, 0)?;
            let bounds = model.step_bounds(cache);
            match self.graphs.get(&bounds) {
                None => {
                    let l = self.eager(model, cache)?;
                    self.graphs.insert(bounds, Slot::Warm);
                    Ok(Outcome::Logits(l, false))
                }
                Some(Slot::Ready(g)) => {
                    if !model.write_step_table(cache)? {
                        candle_core::bail!("the decode step lost its step table")
                    }
                    g.launch().w()?;
                    cache.advance(1);
                    match &self.logits {
                        Some(l) => Ok(Outcome::Logits(l.clone(), true)),
                        None => candle_core::bail!("a graph without its output tensor"),
                    }
                }
                Some(Slot::Warm) => self.capture(model, cache, bounds),
            }
        }

        /// Runs this step eagerly, captures it, replays the capture for the same step and compares.
        fn capture(
            &mut self,
            model: &Model,
            cache: &mut KvCache,
            bounds: Vec<usize>,
        ) -> Result<Outcome> {
            let eager = self.eager(model, cache)?;
            let want = host::read_vec::<f32>(&eager)?;
            let out = match &self.logits {
                Some(l) => l.clone(),
                None => {
                    let l = eager.zeros_like()?;
                    self.logits = Some(l.clone());
                    l
                }
            };
            // Back to this step's position: the table the eager pass wrote is this step's.
            cache.rewind(1);
            let stream = self.dev.cuda_stream();
            let mark = moe_kernels::launch::launched();
            let captured = {
                let _cache_uploads = self.dev.enable_cuda_graph_htod_cache();
                let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
                match stream.begin_capture(mode) {
                    Err(e) => Err(format!("cannot begin a capture: {e}")),
                    Ok(()) => {
                        // Everything the pass allocates is freed inside the capture; its logits
                        // are copied into `out`, which outlives it.
                        let pass = model
                            .decode_step_in_place(&self.ids, cache)
                            .and_then(|l| out.slice_set(&l, 0, 0));
                        // Always ended, so the stream leaves capture mode whatever happened.
                        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
                        match (pass, graph) {
                            (Ok(()), Ok(Some(g))) => Ok(g),
                            (Err(e), _) => Err(format!("capture failed: {e}")),
                            (_, Err(e)) => Err(format!("capture failed: {e}")),
                            (_, Ok(None)) => Err("the capture recorded nothing".to_string()),
                        }
                    }
                }
            };
            moe_kernels::launch::rewind_launched(mark);
            let graph = match captured {
                Ok(g) => g,
                Err(why) => {
                    cache.advance(1);
                    return Ok(Outcome::Off(eager, why));
                }
            };
            // The replay recomputes this step (rewriting the same cache slot with the same values).
            graph.launch().w()?;
            cache.advance(1);
            let got = host::read_vec::<f32>(&out)?;
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
            // The largest difference, NaN if any is (f32::max would skip it).
            let diff = want.iter().zip(&got).fold(0f32, |m, (a, b)| {
                let d = (a - b).abs();
                if d.is_nan() || d > m {
                    d
                } else {
                    m
                }
            });
            if got.len() != want.len() || diff.is_nan() || diff > REPLAY_TOLERANCE * scale {
                return Ok(Outcome::Off(
                    eager,
                    format!("a replay's logits differ from the eager step's by {diff}"),
                ));
            }
            self.census = census(&graph).ok();
            self.graphs.insert(bounds, Slot::Ready(graph));
            Ok(Outcome::Logits(eager, false))
        }
    }

    /// Counts `g`'s nodes by kind (read as raw numbers: a driver may know kinds this build does not).
    fn census(g: &CudaGraph) -> Result<super::NodeCensus> {
        let graph = g.cu_graph();
        let mut n = 0usize;
        // SAFETY: a null node array asks only for the count; the graph lives as long as `g`.
        unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) }
            .result()
            .w()?;
        let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` has room for the `n` nodes the driver reports.
        unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n) }
            .result()
            .w()?;
        let mut c = super::NodeCensus::default();
        for node in nodes.into_iter().take(n) {
            let mut kind = 0u32;
            // SAFETY: CUgraphNodeType is a u32-sized enum; the value is read as a plain u32.
            unsafe { sys::cuGraphNodeGetType(node, (&mut kind as *mut u32).cast()) }
                .result()
                .w()?;
            match kind {
                0 => c.kernels += 1,
                1 | 2 => c.copies += 1,
                10 | 11 => c.allocs += 1,
                _ => c.other += 1,
            }
        }
        Ok(c)
    }
}
