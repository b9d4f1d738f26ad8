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
//! When the model's step cannot be replayed ([`Model::graph_blocker`]: the candle path, experts in
//! host memory, host routing, ...), on a device other than CUDA, or when a capture or its check
//! fails, the decoder says why once on stderr and runs every step eagerly.
//!
//! The bookkeeping above is generic over how a pass is captured and replayed ([`Backend`]): CUDA
//! graphs, or (for the CPU tests, [`GraphDecoder::emulated`]) a capture that records nothing and a
//! replay that runs the captured pass again, which exercises every transition on the emulator.
//!
//! NOT YET RUN ON A GPU: this machine has none; the CUDA part is compile-checked only.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use crate::model::host;
use crate::model::kv_cache::KvCache;
use crate::model::Model;

/// A replay's logits may differ from the eager step's by no more than this share of the largest
/// |logit| (the same kernels on the same inputs: in practice identical).
const REPLAY_TOLERANCE: f32 = 1e-3;

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

/// The decode pass a backend captures or replays: the step at `cache.len()` with the table the
/// cache holds, its logits copied into the decoder's output tensor.
type Pass<'a> = dyn FnMut() -> Result<()> + 'a;

/// How a decode pass is captured and replayed.
trait Backend {
    type Graph;
    /// Keeps small host-to-device uploads cached while the returned guard lives (candle's CUDA
    /// graph upload cache), so the warm-up step fills what a capture will find.
    fn cache_uploads(&self) -> Option<Box<dyn std::any::Any>>;
    /// Records `pass` as a graph (running nothing on the device), or says why it cannot.
    fn capture(&mut self, pass: &mut Pass<'_>) -> std::result::Result<Self::Graph, String>;
    /// Runs a captured graph again (`pass` is the same pass, for a backend that re-runs it).
    fn replay(&self, g: &Self::Graph, pass: &mut Pass<'_>) -> Result<()>;
    /// The graph's nodes, where the backend can count them.
    fn census(&self, g: &Self::Graph) -> Option<NodeCensus>;
}

/// What a step came to.
enum Outcome {
    /// The step's logits; `true` when a replay computed them.
    Logits(Tensor, bool),
    /// The step's logits (computed eagerly), and why graphs are now off.
    Off(Tensor, String),
}

enum Slot<G> {
    /// One eager step with these bounds has run (modules loaded, uploads cached).
    Warm,
    Ready(G),
}

/// The capture bookkeeping of one decoder (one cache).
struct State<B: Backend> {
    backend: B,
    /// The token id the graphs read, `[1, 1]` u32, rewritten before each step.
    ids: Tensor,
    /// The graphs' output, `[1, 1, V]` f32 (allocated at the first capture).
    logits: Option<Tensor>,
    graphs: HashMap<Vec<usize>, Slot<B::Graph>>,
    /// The census of the graph captured last, until the decoder takes it.
    census: Option<NodeCensus>,
}

impl<B: Backend> State<B> {
    fn new(backend: B, model: &Model) -> Result<Self> {
        Ok(State {
            backend,
            ids: Tensor::zeros((1, 1), candle_core::DType::U32, model.device())?,
            logits: None,
            graphs: HashMap::new(),
            census: None,
        })
    }

    fn eager(&self, model: &Model, cache: &mut KvCache) -> Result<Tensor> {
        let _cache_uploads = self.backend.cache_uploads();
        model.forward(&self.ids, cache, false, None)
    }

    fn step(&mut self, model: &Model, cache: &mut KvCache, id: u32) -> Result<Outcome> {
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
                let Some(out) = self.logits.clone() else {
                    candle_core::bail!("a graph without its output tensor")
                };
                let ids = &self.ids;
                let mut pass = || {
                    let l = model.decode_step_in_place(ids, cache)?;
                    out.slice_set(&l, 0, 0)
                };
                self.backend.replay(g, &mut pass)?;
                cache.advance(1);
                Ok(Outcome::Logits(out, true))
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
        let ids = &self.ids;
        // Everything the pass allocates is freed inside it; its logits are copied into `out`,
        // which outlives it.
        let mut pass = || {
            let l = model.decode_step_in_place(ids, cache)?;
            out.slice_set(&l, 0, 0)
        };
        let mark = moe_kernels::launch::launched();
        let captured = {
            let _cache_uploads = self.backend.cache_uploads();
            self.backend.capture(&mut pass)
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
        self.backend.replay(&graph, &mut pass)?;
        moe_kernels::launch::count_graph_replay();
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
        self.census = self.backend.census(&graph);
        self.graphs.insert(bounds, Slot::Ready(graph));
        Ok(Outcome::Logits(eager, false))
    }
}

/// The capture backends a decoder may hold.
enum Engine {
    Off,
    /// The CPU stand-in of the tests: captures record nothing, replays re-run the pass.
    Emulated(State<Rerun>),
    #[cfg(feature = "cuda")]
    Cuda(State<cuda::Graphs>),
}

/// Decodes one token per step at batch 1, replaying captured CUDA graphs where it can.
pub struct GraphDecoder {
    engine: Engine,
    /// Why steps run eagerly, once said; `None` while graphs are on.
    off: Option<String>,
    /// Replays of decode steps so far (each, and each capture's check replay, counted as one
    /// kernel launch by moe-kernels' counter).
    pub replays: u64,
    /// The nodes of the last graph captured: every launch and copy of one eager decode step,
    /// candle's and cuBLAS's included (what moe-kernels' own counter cannot see).
    pub nodes: Option<NodeCensus>,
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
            engine: Engine::Off,
            off: None,
            replays: 0,
            nodes: None,
        };
        match why {
            Some(w) => d.turn_off(w),
            None => d.start(model),
        }
        d
    }

    /// The same bookkeeping with a stand-in for CUDA graphs, on any device: a capture records
    /// nothing and a replay runs the captured pass again (with the step table and token written
    /// as for a graph). For testing the transitions on the CPU; it saves nothing.
    pub fn emulated(model: &Model) -> Result<Self> {
        if let Some(why) = model.graph_blocker() {
            candle_core::bail!("this model's decode step cannot be replayed: {why}")
        }
        Ok(GraphDecoder {
            engine: Engine::Emulated(State::new(Rerun, model)?),
            off: None,
            replays: 0,
            nodes: None,
        })
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
        self.engine = Engine::Off;
    }

    #[cfg(feature = "cuda")]
    fn start(&mut self, model: &Model) {
        match cuda::Graphs::new(model).and_then(|g| State::new(g, model)) {
            Ok(s) => self.engine = Engine::Cuda(s),
            Err(e) => self.turn_off(format!("cannot set up: {e}")),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn start(&mut self, _model: &Model) {
        self.turn_off("this build has no CUDA".into());
    }

    /// The decode step of token `id` at `cache.len()`: `[1, 1, V]` f32 logits, the cache advanced by
    /// one. A replay's logits live in the graph's output tensor until the next step. One decoder
    /// serves one cache: its graphs hold that cache's buffers.
    pub fn step(&mut self, model: &Model, cache: &mut KvCache, id: u32) -> Result<Tensor> {
        let outcome = match &mut self.engine {
            Engine::Off => {
                let ids = Tensor::new(&[id], model.device())?.unsqueeze(0)?;
                return model.forward(&ids, cache, false, None);
            }
            Engine::Emulated(s) => (s.step(model, cache, id)?, s.census.take()),
            #[cfg(feature = "cuda")]
            Engine::Cuda(s) => (s.step(model, cache, id)?, s.census.take()),
        };
        if let Some(n) = outcome.1 {
            self.nodes = Some(n);
        }
        match outcome.0 {
            Outcome::Logits(l, replayed) => {
                if replayed {
                    self.replays += 1;
                    moe_kernels::launch::count_graph_replay();
                }
                Ok(l)
            }
            Outcome::Off(l, why) => {
                self.turn_off(why);
                Ok(l)
            }
        }
    }
}

/// [`GraphDecoder::emulated`]'s backend.
struct Rerun;

impl Backend for Rerun {
    type Graph = ();

    fn cache_uploads(&self) -> Option<Box<dyn std::any::Any>> {
        None
    }

    fn capture(&mut self, _pass: &mut Pass<'_>) -> std::result::Result<(), String> {
        Ok(())
    }

    fn replay(&self, _g: &(), pass: &mut Pass<'_>) -> Result<()> {
        // The pass's launches stand for one graph launch (the decoder counts it).
        let mark = moe_kernels::launch::launched();
        let ran = pass();
        moe_kernels::launch::rewind_launched(mark);
        ran
    }

    fn census(&self, _g: &()) -> Option<NodeCensus> {
        None
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{Device, Result};

    use super::{Backend, NodeCensus, Pass};
    use crate::model::Model;

    /// CUDA graphs captured on candle's stream.
    pub struct Graphs {
        dev: CudaDevice,
    }

    impl Graphs {
        pub fn new(model: &Model) -> Result<Self> {
            let Device::Cuda(dev) = model.device() else {
                candle_core::bail!("not a CUDA device")
            };
            Ok(Graphs { dev: dev.clone() })
        }
    }

    impl Backend for Graphs {
        type Graph = CudaGraph;

        fn cache_uploads(&self) -> Option<Box<dyn std::any::Any>> {
            Some(Box::new(self.dev.enable_cuda_graph_htod_cache()))
        }

        fn capture(&mut self, pass: &mut Pass<'_>) -> std::result::Result<CudaGraph, String> {
            let stream = self.dev.cuda_stream();
            let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
            if let Err(e) = stream.begin_capture(mode) {
                return Err(format!("cannot begin a capture: {e}"));
            }
            let ran = pass();
            // Always ended, so the stream leaves capture mode whatever happened.
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            match (ran, graph) {
                (Ok(()), Ok(Some(g))) => Ok(g),
                (Err(e), _) => Err(format!("capture failed: {e}")),
                (_, Err(e)) => Err(format!("capture failed: {e}")),
                (_, Ok(None)) => Err("the capture recorded nothing".to_string()),
            }
        }

        fn replay(&self, g: &CudaGraph, _pass: &mut Pass<'_>) -> Result<()> {
            g.launch().w()
        }

        fn census(&self, g: &CudaGraph) -> Option<NodeCensus> {
            census(g).ok()
        }
    }

    /// Counts `g`'s nodes by kind (read as raw numbers: a driver may know kinds this build does not).
    fn census(g: &CudaGraph) -> Result<NodeCensus> {
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
        let mut c = NodeCensus::default();
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
