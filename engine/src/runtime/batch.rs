//! Continuous batching: requests join and leave between steps of one ragged forward pass
//! ([`Model::forward_batch`]), on one engine thread that owns the model.
//!
//! Each step takes every running sequence's next token (decode) plus prompt chunks of sequences
//! still being prefilled, at most [`BatchConfig::prefill_chunk`] prompt tokens per step, so a long
//! prompt joins without stalling the running sequences for a whole prefill. The MoE stages see all
//! the step's tokens at once: each expert's weights are read once per step for the whole batch.
//!
//! KV memory is per sequence: each admitted sequence gets its own contiguous cache sized for its
//! prompt plus its `max_new_tokens` (capped at the context), freed when it finishes or its client
//! goes away. A paged cache would pack sequences more tightly, but needs a paged attention kernel on
//! every path; per-sequence caches keep the decode-attention kernel and the CPU attention as they
//! are, and a request's whole KV is reserved at admission, so a running sequence never runs out.
//! Admission is bounded by `max_batch` and by the KV budget, costed as analyze costs it
//! ([`kv_bytes_per_sequence`]); the waiting queue is bounded by `max_waiting` and a submission past
//! it is refused ([`SubmitError::QueueFull`]), never queued without bound.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use super::generate::{validate_prompt, GenerateParams, Sampler, StopReason};
use super::graph::GraphDecoder;
use super::stats::RoutingStats;
use crate::error::{Error, Result};
use crate::model::kv_cache::KvCache;
use crate::model::{Model, SeqStep, Trace};
use crate::spec::bytes::kv_bytes_per_sequence;
use candle_core::Tensor;

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Sequences advanced together in one step at most.
    pub max_batch: usize,
    /// Requests waiting for a slot at most; one more is refused.
    pub max_waiting: usize,
    /// Bytes of KV cache all running sequences may hold together.
    pub kv_budget: u64,
    /// Prompt tokens prefilled per step at most (across sequences), >= 1.
    pub prefill_chunk: usize,
    /// Count routed experts per layer for the metrics (reads routing to the host every layer).
    pub expert_stats: bool,
    /// Replay the steps where every running sequence decodes one token as CUDA graphs
    /// ([`GraphDecoder`]), one set per batch membership (the running sequences' KV caches, kept
    /// in cache-id order). A finished sequence's cache is kept for the next request it fits, so
    /// under steady load, and for one request after another, the membership and its graphs stay;
    /// a batch that shrinks or grows starts a new set, and the sets of the last few memberships
    /// are kept for when it comes back. Kept caches count in the KV budget and are freed, with
    /// their graphs, when a request needs their memory. Off (one line on stderr) where graphs
    /// cannot work, and with `expert_stats`.
    pub cuda_graph: bool,
}

/// What a request hears from the engine, in order: tokens, then exactly one `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(u32),
    Done {
        stop: StopReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Receives a request's events; returns false once nobody listens (the client went away), which
/// cancels the sequence and frees its KV cache.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

pub struct Submission {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub sink: Sink,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {waiting} requests are already waiting (--max-waiting {limit}); retry later")]
    QueueFull { waiting: usize, limit: usize },
    #[error("the request needs {need} bytes of KV cache ({tokens} tokens), more than the whole KV budget of {budget} bytes (--kv-memory)")]
    TooLarge {
        need: u64,
        tokens: usize,
        budget: u64,
    },
    #[error("the engine has stopped")]
    Stopped,
}

/// Counters the server's /metrics reads (updated by the engine thread).
#[derive(Default)]
pub struct EngineStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_used_bytes: AtomicU64,
    pub kv_budget_bytes: AtomicU64,
    pub requests_total: AtomicU64,
    pub cancelled_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    pub steps_total: AtomicU64,
    /// Steps replayed as a CUDA graph (`cuda_graph`).
    pub graph_replays_total: AtomicU64,
    /// moe-kernels launches of the engine thread's steps (a graph replay counts as one; 0 on the
    /// CPU's candle path, where no kernel runs).
    pub kernel_launches_total: AtomicU64,
    /// Wall time spent in forward passes, microseconds.
    pub busy_micros: AtomicU64,
    /// Generated tokens per second over the last second of steps (f64 bits); 0 when idle.
    pub recent_tok_per_s_bits: AtomicU64,
    /// Routed token slots per expert per MoE layer (with `expert_stats`).
    pub experts: Mutex<Option<RoutingStats>>,
}

impl EngineStats {
    pub fn recent_tok_per_s(&self) -> f64 {
        f64::from_bits(self.recent_tok_per_s_bits.load(Relaxed))
    }
}

enum Msg {
    Submit(Box<Submission>),
    Shutdown,
}

/// The engine thread and its queue.
pub struct Engine {
    tx: mpsc::Sender<Msg>,
    stats: Arc<EngineStats>,
    cfg: BatchConfig,
    kv_per_token: u64,
    context: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A running sequence.
struct Seq {
    /// Its KV cache's id, unique within the engine (a recycled cache keeps its id): which caches a
    /// set of graphs was captured for.
    slot: u64,
    sink: Sink,
    cache: KvCache,
    kv_bytes: u64,
    prompt_len: usize,
    /// Prompt tokens not yet prefilled (front first).
    pending: Vec<u32>,
    /// The last sampled token, fed at the next step.
    next: Option<u32>,
    generated: usize,
    params: GenerateParams,
    sampler: Sampler,
}

impl Engine {
    /// Starts the engine thread with `model` (moved there), on the CPU compute pool.
    pub fn start(model: Model, cfg: BatchConfig) -> Result<Engine> {
        if cfg.max_batch == 0 || cfg.prefill_chunk == 0 {
            return Err(Error::Input(
                "--max-batch and the prefill chunk must be at least 1".into(),
            ));
        }
        let kv_per_token =
            kv_bytes_per_sequence(&model.cfg, 1, model.dtype().size_in_bytes() as u64);
        let stats = Arc::new(EngineStats::default());
        stats.kv_budget_bytes.store(cfg.kv_budget, Relaxed);
        if cfg.expert_stats {
            if let Ok(mut e) = stats.experts.lock() {
                *e = Some(RoutingStats::new(&model.cfg));
            }
        }
        let context = model.cfg.max_position_embeddings;
        let (tx, rx) = mpsc::channel();
        let (st, c) = (stats.clone(), cfg.clone());
        // The engine thread runs the kernels' emulator when the thread starting it does.
        let emu = moe_kernels::emu::active();
        let thread = std::thread::Builder::new()
            .name("moe-engine".into())
            .spawn(move || {
                moe_kernels::cpu::on_pool(move || {
                    // Thread-local state of the kernels, set on the pool worker that runs the loop.
                    let _emu = emu.then(moe_kernels::emu::enable);
                    moe_kernels::set_gemv_kernel(model.plan().gemv);
                    Scheduler::new(model, c, st, kv_per_token).run(rx)
                })
            })
            .map_err(|e| Error::io("engine thread", e))?;
        Ok(Engine {
            tx,
            stats,
            cfg,
            kv_per_token,
            context,
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    /// KV bytes a request reserves: its prompt plus `max_new_tokens - 1` (the last token is never
    /// fed back), capped at the context.
    pub fn kv_need(&self, prompt: usize, max_new_tokens: usize) -> (u64, usize) {
        let tokens = capacity(prompt, max_new_tokens, self.context);
        (self.kv_per_token.saturating_mul(tokens as u64), tokens)
    }

    /// Queues a request (its prompt already validated by the caller against the model). Refused
    /// when the queue is full or the request could never fit the KV budget.
    pub fn submit(&self, s: Submission) -> std::result::Result<(), SubmitError> {
        let (need, tokens) = self.kv_need(s.prompt.len(), s.params.max_new_tokens);
        if need > self.cfg.kv_budget {
            return Err(SubmitError::TooLarge {
                need,
                tokens,
                budget: self.cfg.kv_budget,
            });
        }
        // Reserve a waiting place first, so concurrent submissions cannot overfill the queue.
        let waiting = self.stats.waiting.fetch_add(1, Relaxed);
        if waiting >= self.cfg.max_waiting {
            self.stats.waiting.fetch_sub(1, Relaxed);
            return Err(SubmitError::QueueFull {
                waiting,
                limit: self.cfg.max_waiting,
            });
        }
        self.tx.send(Msg::Submit(Box::new(s))).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Relaxed);
            SubmitError::Stopped
        })
    }

    /// Stops taking requests, lets the engine finish every queued and running one, and waits for
    /// its thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Cache positions a sequence needs: prompt + max_new - 1, at least the prompt, at most the context.
fn capacity(prompt: usize, max_new: usize, context: usize) -> usize {
    prompt
        .saturating_add(max_new.saturating_sub(1))
        .min(context)
        .max(prompt)
}

/// Batch memberships whose graphs the serving engine keeps.
const GRAPH_SETS: usize = 4;

/// A finished sequence's KV cache, kept for the next request it fits.
struct Spare {
    slot: u64,
    cache: KvCache,
    kv_bytes: u64,
}

/// The engine thread's state.
struct Scheduler {
    model: Model,
    cfg: BatchConfig,
    stats: Arc<EngineStats>,
    kv_per_token: u64,
    waiting: VecDeque<Box<Submission>>,
    running: Vec<Seq>,
    /// Caches of finished sequences kept for the next request that fits (graph mode only), with
    /// their id and the bytes they hold (still counted in `kv_used`).
    spare: Vec<Spare>,
    kv_used: u64,
    /// (time, tokens) of recent steps, for the recent rate.
    recent: VecDeque<(Instant, usize)>,
    /// The id the next new KV cache gets.
    next_id: u64,
    /// The graphs of the last [`GRAPH_SETS`] batch memberships used (cache ids, in running order,
    /// which is id order in graph mode), the latest first: a batch that shrinks and grows back
    /// (one user, then two, then one again) finds its graphs again.
    graphs: Vec<(Vec<u64>, GraphDecoder)>,
    /// Graphs cannot work here (said once on stderr); every step runs eagerly.
    graphs_off: bool,
}

impl Scheduler {
    fn new(model: Model, cfg: BatchConfig, stats: Arc<EngineStats>, kv_per_token: u64) -> Self {
        if cfg.cuda_graph && cfg.expert_stats {
            eprintln!(
                "moe-run: CUDA graphs off (the expert metrics read routing back every step: \
                 use --no-expert-metrics); decoding with eager launches"
            );
        }
        Scheduler {
            // The expert metrics trace every step (a host read per MoE layer): no graphs.
            graphs_off: !cfg.cuda_graph || cfg.expert_stats,
            model,
            cfg,
            stats,
            kv_per_token,
            waiting: VecDeque::new(),
            running: Vec::new(),
            spare: Vec::new(),
            kv_used: 0,
            recent: VecDeque::new(),
            next_id: 0,
            graphs: Vec::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut open = true;
        loop {
            // Idle: block for work; busy: take what has arrived and go on stepping.
            if self.running.is_empty() && self.waiting.is_empty() {
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok(m) => open &= self.take(m),
                    Err(_) => return,
                }
            }
            while let Ok(m) = rx.try_recv() {
                open &= self.take(m);
            }
            self.admit();
            if let Err(e) = self.step() {
                // A failed step (out of memory, a kernel error) fails the sequences in it, not
                // the server.
                let msg = e.to_string();
                self.graphs.clear();
                self.spare.clear();
                for mut s in self.running.drain(..) {
                    (s.sink)(Event::Failed(msg.clone()));
                }
                self.kv_used = 0;
            }
            self.publish();
        }
    }

    /// Files a message; false on shutdown.
    fn take(&mut self, m: Msg) -> bool {
        match m {
            Msg::Submit(s) => {
                self.waiting.push_back(s);
                true
            }
            Msg::Shutdown => false,
        }
    }

    /// Frees the kept caches of finished sequences, and the graphs captured for any of them.
    fn drop_spares(&mut self) {
        for sp in self.spare.drain(..) {
            self.kv_used = self.kv_used.saturating_sub(sp.kv_bytes);
            self.graphs.retain(|(m, _)| !m.contains(&sp.slot));
        }
    }

    /// The kept cache that holds `tokens` positions: one the latest graphs were captured for
    /// first, then the smallest that fits; `None` when none does.
    fn take_spare(&mut self, tokens: usize) -> Option<Spare> {
        let graphed = |slot: u64| self.graphs.first().is_some_and(|(m, _)| m.contains(&slot));
        let i = (0..self.spare.len())
            .filter(|&i| self.spare[i].cache.capacity() >= tokens)
            .min_by_key(|&i| (!graphed(self.spare[i].slot), self.spare[i].cache.capacity()))?;
        Some(self.spare.swap_remove(i))
    }

    /// Moves waiting requests into the batch while a slot and their KV fit. A request that fits a
    /// finished sequence's kept cache takes it. In graph mode the batch stays in cache-id order, so
    /// the same caches always make the same membership, whatever order requests came and went in.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let tokens = capacity(
                front.prompt.len(),
                front.params.max_new_tokens,
                self.model.cfg.max_position_embeddings,
            );
            let need = self.kv_per_token.saturating_mul(tokens as u64);
            // An invalid prompt fails at once, without waiting for KV.
            let valid = validate_prompt(&self.model, &front.prompt);
            let reuse = match valid {
                Ok(()) => self.take_spare(tokens),
                Err(_) => None,
            };
            let budget = self.cfg.kv_budget;
            let over = |kv_used: u64| kv_used.saturating_add(need) > budget;
            if valid.is_ok() && reuse.is_none() && over(self.kv_used) {
                // Kept caches that fit no request give their memory back first.
                self.drop_spares();
                if over(self.kv_used) && !self.running.is_empty() {
                    break; // waits for a running sequence to free its KV
                }
            }
            let Some(mut sub) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Relaxed);
            self.stats.requests_total.fetch_add(1, Relaxed);
            let (slot, cache, kv_bytes) = match reuse {
                Some(mut sp) => {
                    sp.cache.reset();
                    (sp.slot, sp.cache, sp.kv_bytes)
                }
                None => match valid.and_then(|_| Ok(self.model.new_cache(1, tokens)?)) {
                    Ok(c) => {
                        self.kv_used += need;
                        self.next_id += 1;
                        (self.next_id, c, need)
                    }
                    Err(e) => {
                        (sub.sink)(Event::Failed(e.to_string()));
                        continue;
                    }
                },
            };
            let sampler = Sampler::new(&sub.params.sampling, &sub.prompt);
            let Submission {
                prompt,
                params,
                sink,
            } = *sub;
            let seq = Seq {
                slot,
                sink,
                cache,
                kv_bytes,
                prompt_len: prompt.len(),
                pending: prompt,
                next: None,
                generated: 0,
                params,
                sampler,
            };
            // A new cache has the largest id so far: it goes last, as in eager mode.
            let at = self.running.partition_point(|s| s.slot < slot);
            self.running.insert(at, seq);
        }
    }

    /// The decode step of every running sequence (`inputs` holds one token for each, in running
    /// order) through this membership's graphs: `[B, V]` logits (`[1, 1, V]` for one sequence).
    fn graph_step(&mut self, inputs: &[(usize, Vec<u32>, bool, bool)]) -> Result<Tensor> {
        let members: Vec<u64> = self.running.iter().map(|s| s.slot).collect();
        match self.graphs.iter().position(|(m, _)| *m == members) {
            Some(i) => self.graphs[..=i].rotate_right(1), // the latest first
            None => {
                let d = GraphDecoder::new(&self.model);
                if !d.active() {
                    self.graphs_off = true; // why was said on stderr; not asked again
                    self.drop_spares();
                }
                self.graphs.insert(0, (members, d));
                self.graphs.truncate(GRAPH_SETS);
            }
        }
        let Some((_, decoder)) = self.graphs.first_mut() else {
            return Err(Error::Input("the batch's graph decoder is gone".into()));
        };
        let ids: Vec<u32> = inputs.iter().map(|(_, ids, _, _)| ids[0]).collect();
        let mut caches: Vec<&mut KvCache> = self.running.iter_mut().map(|s| &mut s.cache).collect();
        let before = decoder.replays;
        let logits = decoder.step_each(&self.model, &mut caches, &ids)?;
        self.stats
            .graph_replays_total
            .fetch_add(decoder.replays - before, Relaxed);
        Ok(logits)
    }

    /// One forward pass over the batch; samples, streams and retires sequences.
    fn step(&mut self) -> Result<()> {
        if self.running.is_empty() {
            return Ok(());
        }
        // Each sequence's input this step: its sampled token, or the next chunk of its prompt.
        let mut budget = self.cfg.prefill_chunk;
        // (seq, ids, is a prompt chunk, samples after it)
        let mut inputs: Vec<(usize, Vec<u32>, bool, bool)> = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            if let Some(t) = s.next.take() {
                inputs.push((i, vec![t], false, true));
            } else if !s.pending.is_empty() && budget > 0 {
                let n = s.pending.len().min(budget);
                budget -= n;
                let chunk: Vec<u32> = s.pending.drain(..n).collect();
                inputs.push((i, chunk, true, s.pending.is_empty()));
            }
        }
        if inputs.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut trace = self.cfg.expert_stats.then(Trace::default);
        // Every running sequence decoding one token: the step a graph replays.
        let all_decode = inputs.len() == self.running.len()
            && inputs
                .iter()
                .all(|(_, ids, prefill, _)| !prefill && ids.len() == 1);
        let logits = if all_decode && !self.graphs_off {
            self.graph_step(&inputs)?
        } else {
            // Borrow each input's sequence cache mutably, in running order.
            let mut caches: Vec<Option<&mut KvCache>> = self
                .running
                .iter_mut()
                .map(|s| Some(&mut s.cache))
                .collect();
            let mut steps = Vec::with_capacity(inputs.len());
            for (i, ids, _, _) in &inputs {
                let cache = caches
                    .get_mut(*i)
                    .and_then(Option::take)
                    .ok_or_else(|| Error::Input("a sequence appears twice in a step".into()))?;
                steps.push(SeqStep { ids, cache });
            }
            self.model.forward_batch(&mut steps, trace.as_mut())?
        };
        let mut logits: Vec<f32> = crate::model::host::read_vec(&logits.flatten_all()?)?;
        let vocab = logits.len() / inputs.len().max(1);
        let elapsed = t0.elapsed();
        self.stats.steps_total.fetch_add(1, Relaxed);
        // This thread's count: only the engine thread runs the model.
        self.stats
            .kernel_launches_total
            .store(moe_kernels::launch::launched(), Relaxed);
        self.stats
            .busy_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
        if let (Some(tr), Ok(mut e)) = (&trace, self.stats.experts.lock()) {
            if let Some(e) = e.as_mut() {
                e.record(tr);
            }
        }
        let mut finished = Vec::new();
        let mut produced = 0;
        for (row, (i, ids, prefill, samples)) in inputs.iter().enumerate() {
            let Some(s) = self.running.get_mut(*i) else {
                continue;
            };
            if *prefill {
                self.stats
                    .prompt_tokens_total
                    .fetch_add(ids.len() as u64, Relaxed);
            }
            if !samples {
                continue;
            }
            let Some(row) = logits.get_mut(row * vocab..(row + 1) * vocab) else {
                continue;
            };
            let next = s.sampler.pick(row)?;
            s.generated += 1;
            produced += 1;
            if !(s.sink)(Event::Token(next)) {
                self.stats.cancelled_total.fetch_add(1, Relaxed);
                finished.push((*i, None));
                continue;
            }
            let context = self.model.cfg.max_position_embeddings;
            let stop = if s.params.eos.contains(&next) {
                Some(StopReason::Eos)
            } else if s.generated >= s.params.max_new_tokens {
                Some(StopReason::MaxTokens)
            } else if s.cache.len() >= context || s.cache.len() >= s.cache.capacity() {
                Some(StopReason::ContextFull)
            } else {
                s.next = Some(next);
                None
            };
            if let Some(stop) = stop {
                finished.push((*i, Some(stop)));
            }
        }
        self.stats
            .generated_tokens_total
            .fetch_add(produced as u64, Relaxed);
        let now = Instant::now();
        self.recent.push_back((now, produced));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t).as_secs_f64() > 1.0)
        {
            self.recent.pop_front();
        }
        // Retire from the back so indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, stop) in finished {
            if i >= self.running.len() {
                continue;
            }
            // In graph mode the others keep their (cache-id) order and the cache is kept for the
            // next request that fits (see `admit`).
            let mut s = if self.graphs_off {
                let s = self.running.swap_remove(i);
                self.kv_used = self.kv_used.saturating_sub(s.kv_bytes);
                s
            } else {
                self.running.remove(i)
            };
            // Published before the request hears it is done.
            self.stats.kv_used_bytes.store(self.kv_used, Relaxed);
            self.stats.running.store(self.running.len(), Relaxed);
            if let Some(stop) = stop {
                (s.sink)(Event::Done {
                    stop,
                    prompt_tokens: s.prompt_len,
                    completion_tokens: s.generated,
                });
            }
            if !self.graphs_off {
                self.spare.push(Spare {
                    slot: s.slot,
                    cache: s.cache,
                    kv_bytes: s.kv_bytes,
                });
            }
        }
        Ok(())
    }

    /// Publishes the gauges.
    fn publish(&mut self) {
        let st = &self.stats;
        st.running.store(self.running.len(), Relaxed);
        st.kv_used_bytes.store(self.kv_used, Relaxed);
        let rate = match (self.recent.front(), self.recent.back()) {
            (Some((a, _)), Some((b, _))) if self.recent.len() > 1 => {
                let secs = b.duration_since(*a).as_secs_f64();
                let tokens: usize = self.recent.iter().skip(1).map(|(_, n)| n).sum();
                if secs > 0.0 {
                    tokens as f64 / secs
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        let rate = if self.running.is_empty() { 0.0 } else { rate };
        st.recent_tok_per_s_bits.store(rate.to_bits(), Relaxed);
    }
}
