//! The continuous-batching engine (`runtime::batch`) on tiny-kjv: a sequence's greedy output does
//! not depend on what else is in the batch, the KV budget and the waiting queue bound what runs,
//! and a sequence whose client goes away is cancelled and frees its KV.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::Duration;

use candle_core::DType;
use moe::loader::embedded::TINY_KJV;
use moe::loader::LoadOptions;
use moe::model::Model;
use moe::runtime::batch::{BatchConfig, Engine, Event, Submission, SubmitError};
use moe::runtime::generate::{generate, GenerateParams, SamplingParams, StopReason};
use moe::runtime::tokenizer::TextTokenizer;

/// 16 different prompts of different lengths (KJV-like text).
fn prompts(model: &Model) -> Vec<Vec<u32>> {
    let tok = TextTokenizer::embedded(&TINY_KJV, &model.cfg).unwrap();
    common::KJV_PROMPTS
        .iter()
        .map(|s| tok.encode(s).unwrap())
        .collect()
}

fn greedy(max_new: usize) -> GenerateParams {
    GenerateParams {
        max_new_tokens: max_new,
        sampling: SamplingParams::greedy(),
        eos: vec![],
        cuda_graph: false,
    }
}

fn config(max_batch: usize, kv_budget: u64) -> BatchConfig {
    BatchConfig {
        max_batch,
        max_waiting: 64,
        kv_budget,
        prefill_chunk: 512,
        expert_stats: true,
        cuda_graph: false,
    }
}

/// Each prompt's greedy ids generated alone (batch 1).
fn alone(model: &Model, prompts: &[Vec<u32>], params: &GenerateParams) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| {
            generate(model, p, params, |_| Ok(()), None)
                .unwrap()
                .generated_ids
        })
        .collect()
}

/// Submits every prompt at once and collects each one's ids and stop reason.
fn run_batched(
    engine: &Engine,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
) -> Vec<(Vec<u32>, StopReason)> {
    let each: Vec<_> = prompts.iter().map(|_| params.clone()).collect();
    run_each(engine, prompts, &each)
}

/// [`run_batched`] with each prompt's own parameters.
fn run_each(
    engine: &Engine,
    prompts: &[Vec<u32>],
    each: &[GenerateParams],
) -> Vec<(Vec<u32>, StopReason)> {
    let rxs: Vec<_> = prompts
        .iter()
        .zip(each)
        .map(|(p, params)| {
            let (tx, rx) = mpsc::channel();
            engine
                .submit(Submission {
                    prompt: p.clone(),
                    params: params.clone(),
                    sink: Box::new(move |e| tx.send(e).is_ok()),
                })
                .unwrap();
            rx
        })
        .collect();
    rxs.into_iter()
        .map(|rx| {
            let mut ids = Vec::new();
            loop {
                match rx.recv_timeout(Duration::from_secs(120)).unwrap() {
                    Event::Token(t) => ids.push(t),
                    Event::Done { stop, .. } => return (ids, stop),
                    Event::Failed(m) => panic!("failed: {m}"),
                }
            }
        })
        .collect()
}

/// 16 sequences in one batch give exactly the ids each gives alone (f32), and with the stored bf16
/// weights kept 16-bit (the CLI's default for tiny-kjv on the CPU) too.
#[test]
fn greedy_output_does_not_depend_on_the_batch() {
    let bf16 = LoadOptions {
        weight_dtype: Some(DType::BF16),
        ..Default::default()
    };
    for (what, opts) in [("f32", LoadOptions::default()), ("bf16 weights", bf16)] {
        let model = TINY_KJV.load(&opts).unwrap();
        let prompts = prompts(&model);
        let params = greedy(24);
        let alone = alone(&model, &prompts, &params);
        let engine = Engine::start(model, config(16, u64::MAX)).unwrap();
        let batched = run_batched(&engine, &prompts, &params);
        for (i, ((ids, stop), want)) in batched.iter().zip(&alone).enumerate() {
            assert_eq!(*stop, StopReason::MaxTokens);
            assert_eq!(ids, want, "{what}: prompt {i} batched vs alone");
        }
        let st = engine.stats();
        assert_eq!(st.requests_total.load(Relaxed), 16);
        assert_eq!(st.generated_tokens_total.load(Relaxed), 16 * 24);
        // Every step after the prefills advanced all 16 at once: far fewer steps than tokens.
        assert!(st.steps_total.load(Relaxed) < 16 * 24 / 4, "{what}: steps");
        let experts = st.experts.lock().unwrap();
        let tokens = experts.as_ref().unwrap().tokens;
        let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
        assert_eq!(
            tokens as usize,
            prompt_tokens + 16 * 23,
            "{what}: routed tokens"
        );
    }
}

/// A prompt prefilled in chunks (several steps, interleaved with running sequences) gives the
/// same greedy ids as one prefill pass.
#[test]
fn chunked_prefill_gives_the_same_ids() {
    let model = TINY_KJV.load(&LoadOptions::default()).unwrap();
    let prompts = prompts(&model);
    let params = greedy(12);
    let alone = alone(&model, &prompts, &params);
    let mut cfg = config(8, u64::MAX);
    cfg.prefill_chunk = 3;
    let engine = Engine::start(model, cfg).unwrap();
    let batched = run_batched(&engine, &prompts, &params);
    let same = batched
        .iter()
        .zip(&alone)
        .filter(|((ids, _), want)| ids == *want)
        .count();
    assert_eq!(same, prompts.len(), "chunked prefill changed greedy ids");
}

/// With room for two sequences' KV, 6 requests all finish (the others wait for KV to be freed)
/// and every reservation is returned; a request larger than the whole budget is refused at once.
#[test]
fn the_kv_budget_bounds_the_batch() {
    let model = TINY_KJV.load(&LoadOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = prompts(&model).into_iter().take(6).collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let params = greedy(10);
    let per_token = moe::spec::bytes::kv_bytes_per_token(&model.cfg, 4);
    // Two of the longest sequences fit, a third does not.
    let budget = 2 * per_token * (longest + 9) as u64 + per_token;
    let engine = Engine::start(model, config(16, budget)).unwrap();
    let (need, _) = engine.kv_need(longest, 10);
    assert!(need * 3 > budget && need * 2 <= budget);
    let out = run_batched(&engine, &prompts, &params);
    assert!(out.iter().all(|(ids, _)| ids.len() == 10));
    assert_eq!(engine.stats().kv_used_bytes.load(Relaxed), 0);
    let too_big = engine.submit(Submission {
        prompt: vec![1; 100],
        params: greedy(400),
        sink: Box::new(|_| true),
    });
    assert!(
        matches!(too_big, Err(SubmitError::TooLarge { .. })),
        "{too_big:?}"
    );
}

/// The waiting queue is bounded: past `max_waiting`, submissions are refused, not queued.
#[test]
fn a_full_queue_refuses() {
    let model = TINY_KJV.load(&LoadOptions::default()).unwrap();
    let prompt = prompts(&model).remove(0);
    let mut cfg = config(1, u64::MAX);
    cfg.max_waiting = 2;
    let engine = Engine::start(model, cfg).unwrap();
    let mut refused = 0;
    let mut rxs = Vec::new();
    for _ in 0..8 {
        let (tx, rx) = mpsc::channel();
        match engine.submit(Submission {
            prompt: prompt.clone(),
            params: greedy(200),
            sink: Box::new(move |e| tx.send(e).is_ok()),
        }) {
            Ok(()) => rxs.push(rx),
            Err(SubmitError::QueueFull { limit, .. }) => {
                assert_eq!(limit, 2);
                refused += 1
            }
            Err(e) => panic!("{e}"),
        }
    }
    // At most one running and two waiting can have been accepted by the time the loop ends.
    assert!(rxs.len() <= 3, "{} accepted", rxs.len());
    assert_eq!(refused + rxs.len(), 8);
}

/// A client that stops listening has its sequence cancelled and its KV freed; the others go on.
#[test]
fn a_gone_client_is_cancelled_and_frees_its_kv() {
    let model = TINY_KJV.load(&LoadOptions::default()).unwrap();
    let prompt = prompts(&model).remove(1);
    let engine = Engine::start(model, config(4, u64::MAX)).unwrap();
    let (tx, rx) = mpsc::channel();
    let mut seen = 0;
    engine
        .submit(Submission {
            prompt: prompt.clone(),
            params: greedy(300),
            sink: Box::new(move |e| {
                seen += 1;
                seen <= 3 && tx.send(e).is_ok()
            }),
        })
        .unwrap();
    let kept = run_batched(&engine, std::slice::from_ref(&prompt), &greedy(20));
    assert_eq!(kept[0].0.len(), 20);
    let got: Vec<Event> = rx.iter().collect();
    assert_eq!(got.len(), 3, "{got:?}");
    let st = engine.stats();
    for _ in 0..100 {
        if st.running.load(Relaxed) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(st.cancelled_total.load(Relaxed), 1);
    assert_eq!(st.kv_used_bytes.load(Relaxed), 0);
    assert_eq!(st.running.load(Relaxed), 0);
}

/// `serve --cuda-graph` on the kernels' emulator (the engine thread runs it when the thread that
/// starts the engine does, and the graph decoder then takes its stand-in backend, whose replay
/// re-runs the captured pass): four ragged prompts give the same greedy ids with and without graphs,
/// the steps where all four decode are replayed, and sequences finishing one after another (a new
/// set of graphs for each membership) still give the eager ids; under steady load a new request
/// takes a finished one's cache and the graphs replay on; a CPU engine with graphs asked
/// for runs eagerly.
#[test]
fn serving_with_graphs_gives_the_eager_ids() {
    use moe::model::ExecPath;
    let load = || {
        let mut m = TINY_KJV.load(&LoadOptions::default()).unwrap();
        m.set_exec_path(ExecPath::Kernels);
        m
    };
    let model = load();
    let prompts: Vec<Vec<u32>> = prompts(&model).into_iter().take(4).collect();
    let params = greedy(10);
    let run = |cuda_graph: bool, each: &[GenerateParams]| {
        let _emu = moe_kernels::emu::enable().unwrap();
        let mut cfg = config(4, u64::MAX);
        cfg.expert_stats = false;
        cfg.cuda_graph = cuda_graph;
        let engine = Engine::start(load(), cfg).unwrap();
        let out = run_each(&engine, &prompts, each);
        (out, engine.stats().graph_replays_total.load(Relaxed))
    };
    let same = vec![params.clone(); 4];
    let (eager, none) = run(false, &same);
    let (graphs, replays) = run(true, &same);
    assert_eq!(none, 0);
    assert_eq!(graphs, eager);
    assert!(eager.iter().all(|(ids, _)| ids.len() == 10));
    // One step prefills all four prompts and samples each one's first token; the 9 steps after it
    // decode all four together (they finish together): one warm-up, one capture, 7 replays.
    assert_eq!(replays, 7);
    // 4, 7, 10 and 10 tokens: after the prefill step, three decode steps with all four, three with
    // the last three, three with the last two. Each membership warms up, captures and replays once.
    let staggered: Vec<_> = [4, 7, 10, 10].into_iter().map(greedy).collect();
    let (eager, _) = run(false, &staggered);
    let (graphs, replays) = run(true, &staggered);
    assert_eq!(graphs, eager);
    assert_eq!(
        graphs.iter().map(|(ids, _)| ids.len()).collect::<Vec<_>>(),
        [4, 7, 10, 10]
    );
    assert_eq!(replays, 3);
    // Steady load, two at a time: the same prompt three times with 4, 12 and 4 new tokens. The
    // first finishes after three decode steps (warm-up, capture, one replay); the third request
    // takes its kept cache, so after its prefill step the batch is the same two
    // caches and their graphs replay at once (3); then the second runs alone (a new one-cache
    // batch: warm-up, capture, 2 replays). 1 + 3 + 2 = 6 (5 if the second request misses the first
    // step); a new set of graphs per membership would give 1 + 1 + 2 = 4.
    let same_prompt = vec![prompts[0].clone(); 3];
    let steady: Vec<_> = [4, 12, 4].into_iter().map(greedy).collect();
    let run2 = |cuda_graph: bool| {
        let _emu = moe_kernels::emu::enable().unwrap();
        let mut cfg = config(2, u64::MAX);
        cfg.expert_stats = false;
        cfg.cuda_graph = cuda_graph;
        let engine = Engine::start(load(), cfg).unwrap();
        let out = run_each(&engine, &same_prompt, &steady);
        let replays = engine.stats().graph_replays_total.load(Relaxed);
        // Then one more request after the engine has gone idle: it takes the kept cache the last
        // graphs were captured for (the second request's), and they replay from its first decode
        // step.
        let again = run_each(&engine, &same_prompt[..1], &steady[..1]);
        let st = engine.stats();
        for _ in 0..100 {
            if st.running.load(Relaxed) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let kept = st.kv_used_bytes.load(Relaxed);
        let total = st.graph_replays_total.load(Relaxed);
        (out, again, replays, total - replays, kept)
    };
    let (eager, eager_again, _, _, kept) = run2(false);
    assert_eq!(kept, 0, "without graphs a finished sequence's KV is freed");
    let (graphs, again, replays, replays_again, kept) = run2(true);
    assert_eq!((&graphs, &again), (&eager, &eager_again));
    assert_eq!(
        graphs.iter().map(|(ids, _)| ids.len()).collect::<Vec<_>>(),
        [4, 12, 4]
    );
    assert!((5..=6).contains(&replays), "{replays} replays");
    // Its 3 decode steps, all replays (a new set of graphs would warm up, capture and replay 1).
    assert_eq!(replays_again, 3);
    assert!(kept > 0, "the kept caches stay counted while idle");
    // The CPU without the emulator: no graphs, the same ids.
    let mut cfg = config(4, u64::MAX);
    cfg.expert_stats = false;
    cfg.cuda_graph = true;
    let engine = Engine::start(model, cfg).unwrap();
    let cpu = run_batched(&engine, &prompts, &params);
    assert_eq!(engine.stats().graph_replays_total.load(Relaxed), 0);
    assert!(cpu.iter().all(|(ids, _)| ids.len() == 10));
}

/// `serve --cuda-graph` keeps the graphs of its last few batch memberships: two requests (12 and 4
/// new tokens, so the batch shrinks to one), then, once idle, two more of the same lengths. The
/// second pair takes the kept caches (the longer one the cache the latest graphs hold, the shorter
/// one the other), so both its memberships, two caches and then one, are ones seen before: every
/// decode step replays (11; 10 if the second request misses the first step), where a new set of
/// graphs per membership would warm up and capture twice (7).
#[test]
fn serving_with_graphs_keeps_the_graphs_of_recent_batches() {
    use moe::model::ExecPath;
    let _emu = moe_kernels::emu::enable().unwrap();
    let mut model = TINY_KJV.load(&LoadOptions::default()).unwrap();
    model.set_exec_path(ExecPath::Kernels);
    let prompt = prompts(&model).remove(0);
    let mut cfg = config(2, u64::MAX);
    cfg.expert_stats = false;
    cfg.cuda_graph = true;
    let engine = Engine::start(model, cfg).unwrap();
    let pair = [prompt.clone(), prompt];
    let each = [greedy(12), greedy(4)];
    let replays = || engine.stats().graph_replays_total.load(Relaxed);
    let first = run_each(&engine, &pair, &each);
    let before = replays();
    let second = run_each(&engine, &pair, &each);
    assert_eq!(first, second);
    assert!(
        (10..=11).contains(&(replays() - before)),
        "{} replays",
        replays() - before
    );
}
