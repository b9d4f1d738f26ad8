//! The decode step as a CUDA graph (`--cuda-graph`): one replay per decode step instead of every
//! kernel launch of the step, at batch 1 or for B sequences decoding together (one cache each; the
//! graphs are keyed by every cache's key bounds).
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

use candle_core::{DType, Result, Tensor};

use crate::model::host;
use crate::model::kv_cache::KvCache;
use crate::model::{Model, SeqStep};

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

/// The capture bookkeeping of one decoder (one set of caches, one per sequence).
struct State<B: Backend> {
    backend: B,
    /// The token ids the graphs read, u32, rewritten before each step: `[1, 1]` for one sequence
    /// (the pass of [`Model::decode_step_in_place`]), `[B]` for B (of
    /// [`Model::decode_batch_in_place`]); sized at the first step.
    ids: Option<Tensor>,
    /// The graphs' output, `[1, 1, V]` or `[B, V]` f32 (allocated at the first capture).
    logits: Option<Tensor>,
    graphs: HashMap<Vec<usize>, Slot<B::Graph>>,
    /// The census of the graph captured last, until the decoder takes it.
    census: Option<NodeCensus>,
}

impl<B: Backend> State<B> {
    fn new(backend: B) -> Self {
        State {
            backend,
            ids: None,
            logits: None,
            graphs: HashMap::new(),
            census: None,
        }
    }

    /// A step run eagerly, from the token ids on the host.
    fn eager(&self, model: &Model, caches: &mut [&mut KvCache], ids: &[u32]) -> Result<Tensor> {
        let _cache_uploads = self.backend.cache_uploads();
        eager_step(model, caches, ids)
    }

    fn step(&mut self, model: &Model, caches: &mut [&mut KvCache], ids: &[u32]) -> Result<Outcome> {
        let shape: &[usize] = match caches.len() {
            1 => &[1, 1],
            b => &[b],
        };
        let held = match &self.ids {
            Some(t) if t.dims() == shape => t.clone(),
            Some(t) => candle_core::bail!(
                "one graph decoder serves one batch: ids {:?}, then {:?}",
                t.dims(),
                shape
            ),
            None => self
                .ids
                .insert(Tensor::zeros(shape, DType::U32, model.device())?)
                .clone(),
        };
        // One host-to-device copy into the buffer the graphs read.
        host::write_u32(&held, ids)?;
        // Several sequences share the longest one's key bound: their graphs change when it crosses
        // a power of two, not whenever any of them does. (One sequence's floor is its own length: it
        // changes no bound except a chunked layer's, which then stays at the chunk once one is full;
        // setting it also clears a floor left by a batch the cache was in.)
        let floor = caches.iter().map(|c| c.len() + 1).max().unwrap_or(0);
        caches.iter_mut().for_each(|c| c.set_key_floor(floor));
        let bounds: Vec<usize> = caches.iter().flat_map(|c| model.step_bounds(c)).collect();
        match self.graphs.get(&bounds) {
            None => {
                let l = self.eager(model, caches, ids)?;
                self.graphs.insert(bounds, Slot::Warm);
                Ok(Outcome::Logits(l, false))
            }
            Some(Slot::Ready(g)) => {
                for c in caches.iter_mut() {
                    if !model.write_step_table(c)? {
                        candle_core::bail!("the decode step lost its step table")
                    }
                }
                let Some(out) = self.logits.clone() else {
                    candle_core::bail!("a graph without its output tensor")
                };
                let mut pass = || out.slice_set(&in_place_step(model, caches, &held)?, 0, 0);
                self.backend.replay(g, &mut pass)?;
                caches.iter_mut().for_each(|c| c.advance(1));
                Ok(Outcome::Logits(out, true))
            }
            Some(Slot::Warm) => self.capture(model, caches, ids, &held, bounds),
        }
    }

    /// Runs this step eagerly, captures it, replays the capture for the same step and compares.
    fn capture(
        &mut self,
        model: &Model,
        caches: &mut [&mut KvCache],
        ids: &[u32],
        held: &Tensor,
        bounds: Vec<usize>,
    ) -> Result<Outcome> {
        let eager = self.eager(model, caches, ids)?;
        let want = host::read_vec::<f32>(&eager)?;
        let out = match &self.logits {
            Some(l) => l.clone(),
            None => {
                let l = eager.zeros_like()?;
                self.logits = Some(l.clone());
                l
            }
        };
        // Back to this step's position: the tables the eager pass wrote are this step's.
        caches.iter_mut().for_each(|c| c.rewind(1));
        // Everything the pass allocates is freed inside it; its logits are copied into `out`,
        // which outlives it.
        let mut pass = || out.slice_set(&in_place_step(model, caches, held)?, 0, 0);
        let mark = moe_kernels::launch::launched();
        let captured = {
            let _cache_uploads = self.backend.cache_uploads();
            self.backend.capture(&mut pass)
        };
        moe_kernels::launch::rewind_launched(mark);
        let graph = match captured {
            Ok(g) => g,
            Err(why) => {
                caches.iter_mut().for_each(|c| c.advance(1));
                return Ok(Outcome::Off(eager, why));
            }
        };
        // The replay recomputes this step (rewriting the same cache slots with the same values).
        self.backend.replay(&graph, &mut pass)?;
        moe_kernels::launch::count_graph_replay();
        caches.iter_mut().for_each(|c| c.advance(1));
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

/// One decode step run eagerly from host token ids, one per cache: `[1, 1, V]` logits for one
/// sequence ([`Model::forward`]), `[B, V]` for several ([`Model::forward_batch`]); the caches
/// advance.
fn eager_step(model: &Model, caches: &mut [&mut KvCache], ids: &[u32]) -> Result<Tensor> {
    if ids.len() != caches.len() {
        candle_core::bail!("{} token ids for {} caches", ids.len(), caches.len())
    }
    match caches {
        [cache] => {
            let t = Tensor::new(ids, model.device())?.unsqueeze(0)?;
            model.forward(&t, cache, false, None)
        }
        _ => {
            let mut seqs: Vec<_> = caches
                .iter_mut()
                .zip(ids.chunks(1))
                .map(|(cache, ids)| SeqStep { ids, cache })
                .collect();
            model.forward_batch(&mut seqs, None)
        }
    }
}

/// The pass a graph captures: the decode step of the device token ids `ids` from the step tables
/// the caches hold, in the shape [`eager_step`] gives.
fn in_place_step(model: &Model, caches: &mut [&mut KvCache], ids: &Tensor) -> Result<Tensor> {
    match caches {
        [cache] => model.decode_step_in_place(ids, cache),
        _ => model.decode_batch_in_place(ids, caches),
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

/// Decodes one token per sequence per step, replaying captured CUDA graphs where it can.
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
    /// A decoder for `model`; graphs are off (with the reason on stderr) where they cannot work. On a
    /// thread running the kernels' emulator, [`GraphDecoder::emulated`]'s stand-in.
    pub fn new(model: &Model) -> Self {
        let emulator = moe_kernels::emu::active() && model.device().is_cpu();
        let why = if emulator {
            match model.graph_blocker() {
                None => return Self::stand_in(),
                blocked => blocked,
            }
        } else if !model.device().is_cuda() {
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
        Ok(Self::stand_in())
    }

    fn stand_in() -> Self {
        GraphDecoder {
            engine: Engine::Emulated(State::new(Rerun)),
            off: None,
            replays: 0,
            nodes: None,
        }
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
        match cuda::Graphs::new(model).map(State::new) {
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
        self.step_each(model, &mut [cache], &[id])
    }

    /// The decode step of B sequences, token `ids[b]` at `caches[b].len()`: `[B, V]` f32 logits
    /// (`[1, 1, V]` for B = 1, as [`GraphDecoder::step`]), every cache advanced by one. The graphs
    /// are keyed by every cache's key bounds and hold these caches' buffers: one decoder serves one
    /// batch, the same caches at every step.
    pub fn step_batch(
        &mut self,
        model: &Model,
        caches: &mut [KvCache],
        ids: &[u32],
    ) -> Result<Tensor> {
        self.step_each(model, &mut caches.iter_mut().collect::<Vec<_>>(), ids)
    }

    /// [`GraphDecoder::step_batch`] over caches held elsewhere (the serving engine's sequences).
    pub fn step_each(
        &mut self,
        model: &Model,
        caches: &mut [&mut KvCache],
        ids: &[u32],
    ) -> Result<Tensor> {
        let outcome = match &mut self.engine {
            Engine::Off => return eager_step(model, caches, ids),
            Engine::Emulated(s) => (s.step(model, caches, ids)?, s.census.take()),
            #[cfg(feature = "cuda")]
            Engine::Cuda(s) => (s.step(model, caches, ids)?, s.census.take()),
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
