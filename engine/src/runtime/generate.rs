//! The generation loop: validate the prompt, prefill it in one forward pass, then decode one
//! token at a time against the KV cache until `max_new_tokens`, EOS, or the context is full.

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::error::{Error, Result};
use crate::model::{Model, Trace};

#[derive(Debug, Clone, Default)]
pub struct SamplingParams {
    /// <= 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Drop tokens whose probability is below `min_p` times the most likely one's (on the
    /// penalised logits, before temperature, as llama.cpp's min-p), 0 < min_p <= 1.
    pub min_p: Option<f64>,
    /// llama.cpp's repetition penalty over the last `last_n` tokens (prompt included).
    pub repeat: Option<RepeatPenalty>,
}

/// A logit of a token seen in the last `last_n` ids is divided by `penalty` when positive and
/// multiplied by it when negative (CTRL's penalty, as llama.cpp and transformers apply it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RepeatPenalty {
    pub penalty: f32,
    pub last_n: usize,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams::default()
    }

    /// True when the next token is the plain argmax of the logits (no penalty or filter moves it).
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0 && self.repeat.is_none()
    }

    pub(crate) fn processor(&self) -> LogitsProcessor {
        let temperature = self.temperature;
        let top_p = self.top_p.filter(|p| *p < 1.0);
        let sampling = match (temperature <= 0.0, self.top_k, top_p) {
            (true, _, _) => Sampling::ArgMax,
            (false, None, None) => Sampling::All { temperature },
            (false, Some(k), None) => Sampling::TopK { k, temperature },
            (false, None, Some(p)) => Sampling::TopP { p, temperature },
            (false, Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        };
        LogitsProcessor::from_sampling(self.seed, sampling)
    }
}

/// Picks tokens from a sequence's logits: the repetition penalty over its recent ids, min-p, then
/// greedy (the first maximum, as torch's argmax) or candle's sampler (temperature, top-k, top-p).
pub struct Sampler {
    params: SamplingParams,
    inner: LogitsProcessor,
    /// The last `repeat.last_n` ids, oldest first.
    recent: std::collections::VecDeque<u32>,
}

impl Sampler {
    /// A sampler for a sequence that starts with `prompt` (the penalty's first history).
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Self {
        let mut s = Sampler {
            inner: params.processor(),
            params: params.clone(),
            recent: Default::default(),
        };
        prompt.iter().for_each(|&t| s.accept(t));
        s
    }

    /// Records `id` as generated (the device-side greedy path picks without [`Self::pick`]).
    pub fn accept(&mut self, id: u32) {
        if let Some(r) = self.params.repeat {
            self.recent.push_back(id);
            while self.recent.len() > r.last_n {
                self.recent.pop_front();
            }
        }
    }

    /// The next token from one row of logits (modified in place), recorded in the history.
    pub fn pick(&mut self, row: &mut [f32]) -> Result<u32> {
        if let Some(r) = self.params.repeat {
            let mut seen: Vec<u32> = self.recent.iter().copied().collect();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = row.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / r.penalty
                    } else {
                        *l * r.penalty
                    };
                }
            }
        }
        let id = if self.params.temperature <= 0.0 {
            first_max(row)
        } else {
            if let Some(min_p) = self.params.min_p {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let floor = max + (min_p as f32).ln();
                row.iter_mut()
                    .filter(|l| **l < floor)
                    .for_each(|l| *l = f32::NEG_INFINITY);
            }
            let t = Tensor::from_slice(row, row.len(), &Device::Cpu)?;
            self.inner.sample(&t)?
        };
        self.accept(id);
        Ok(id)
    }
}

/// The index of the first maximum (torch's argmax).
fn first_max(row: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut max = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > max {
            max = v;
            best = i;
        }
    }
    best as u32
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop after emitting any of these (the EOS token is included in the output).
    pub eos: Vec<u32>,
    /// Decode through [`super::graph::GraphDecoder`] (CUDA graph replays where the step allows;
    /// not while tracing routing, which reads it back every step).
    pub cuda_graph: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    Eos,
    ContextFull,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::MaxTokens => "max tokens",
            StopReason::Eos => "eos",
            StopReason::ContextFull => "context full",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// Wall time of the prompt forward pass (which also yields the first new token).
    pub prefill_secs: f64,
    /// Wall time of the remaining single-token steps.
    pub decode_secs: f64,
    pub stop: StopReason,
    /// Bytes allocated for the KV cache of this request.
    pub kv_cache_bytes: usize,
    /// Bytes one token occupies in that cache, across all layers.
    pub kv_cache_bytes_per_token: usize,
}

impl Generation {
    /// Prompt tokens per second of the prefill pass (`None` if it was not timed).
    pub fn prefill_tok_per_s(&self) -> Option<f64> {
        (self.prefill_secs > 0.0).then(|| self.prompt_ids.len() as f64 / self.prefill_secs)
    }

    /// Tokens produced by decode steps (all but the first) per second.
    pub fn decode_tok_per_s(&self) -> Option<f64> {
        let steps = self.generated_ids.len().saturating_sub(1);
        (steps > 0 && self.decode_secs > 0.0).then(|| steps as f64 / self.decode_secs)
    }
}

/// Checks a prompt against the model: non-empty, every id < vocab, fits the context.
pub fn validate_prompt(model: &Model, ids: &[u32]) -> Result<()> {
    let cfg = &model.cfg;
    if ids.is_empty() {
        return Err(Error::Input(
            "the prompt is empty: give at least one token".into(),
        ));
    }
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= cfg.vocab_size)
    {
        return Err(Error::Input(format!(
            "token id {id} at position {i} is out of range: vocab_size is {}",
            cfg.vocab_size
        )));
    }
    if ids.len() > cfg.max_position_embeddings {
        return Err(Error::Input(format!(
            "the prompt has {} tokens, more than the model's context of {} (max_position_embeddings)",
            ids.len(),
            cfg.max_position_embeddings
        )));
    }
    Ok(())
}

/// The next token from the last position's logits `[1, 1, V]`, with exactly one device-to-host read
/// (counted by `model::host`): greedy takes the argmax on the device (first maximum, as torch) and
/// reads back the id; sampling reads the logits and samples on the host.
pub fn next_token(sampler: &mut Sampler, logits: &Tensor) -> Result<u32> {
    use crate::model::host;
    let logits = logits.flatten_all()?;
    if sampler.params.is_plain_greedy() {
        let id = host::read_scalar::<u32>(&logits.argmax(0)?)?;
        sampler.accept(id);
        return Ok(id);
    }
    sampler.pick(&mut host::read_vec::<f32>(&logits)?)
}

/// Generates up to `p.max_new_tokens` tokens after `prompt`, calling `on_token` with each new
/// id as soon as it is chosen, and `on_trace` with the routing of every forward pass. With
/// `max_new_tokens == 0` only the prompt's forward pass runs (prefill only, timed).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    p: &GenerateParams,
    mut on_token: impl FnMut(u32) -> Result<()>,
    mut on_trace: Option<&mut dyn FnMut(&Trace)>,
) -> Result<Generation> {
    validate_prompt(model, prompt)?;
    let context = model.cfg.max_position_embeddings;
    // The last generated token is never fed back, so the cache needs prompt + max_new - 1.
    let capacity = prompt
        .len()
        .saturating_add(p.max_new_tokens.saturating_sub(1))
        .min(context);
    let mut cache = model.new_cache(1, capacity.max(prompt.len()))?;
    let mut sampler = Sampler::new(&p.sampling, prompt);
    let mut trace = on_trace.as_ref().map(|_| Trace::default());
    let mut generated = Vec::with_capacity(p.max_new_tokens.min(context));
    let device = model.device();

    let mut graphs = match (p.cuda_graph, trace.is_some()) {
        (true, false) => Some(super::graph::GraphDecoder::new(model)),
        (true, true) => {
            eprintln!("moe-run: CUDA graphs off (routing statistics read every step back); decoding with eager launches");
            None
        }
        (false, _) => None,
    };

    let mut stop = StopReason::MaxTokens;
    let t0 = Instant::now();
    let mut input = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut prefill_secs = 0.0;
    if p.max_new_tokens == 0 {
        model.forward(&input, &mut cache, false, trace.as_mut())?;
        device.synchronize()?;
        prefill_secs = t0.elapsed().as_secs_f64();
        if let (Some(f), Some(tr)) = (on_trace.as_mut(), trace.as_ref()) {
            f(tr);
        }
    }
    while generated.len() < p.max_new_tokens {
        let logits = match (graphs.as_mut(), generated.last()) {
            (Some(g), Some(&id)) => g.step(model, &mut cache, id)?,
            _ => model.forward(&input, &mut cache, false, trace.as_mut())?, // [1, 1, V]
        };
        let next = next_token(&mut sampler, &logits)?;
        if generated.is_empty() {
            prefill_secs = t0.elapsed().as_secs_f64();
        }
        if let (Some(f), Some(tr)) = (on_trace.as_mut(), trace.as_ref()) {
            f(tr);
        }
        generated.push(next);
        on_token(next)?;
        if p.eos.contains(&next) {
            stop = StopReason::Eos;
            break;
        }
        if generated.len() < p.max_new_tokens && cache.len() >= context {
            stop = StopReason::ContextFull;
            break;
        }
        input = Tensor::new(&[next], device)?.unsqueeze(0)?;
    }
    let total = t0.elapsed().as_secs_f64();
    Ok(Generation {
        prompt_ids: prompt.to_vec(),
        generated_ids: generated,
        prefill_secs,
        decode_secs: total - prefill_secs,
        stop,
        kv_cache_bytes: cache.bytes(),
        kv_cache_bytes_per_token: cache.bytes_per_token(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` draws from `p`'s processor on fixed `logits`: how often each id came up.
    fn draws(p: &SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = p.processor();
        let t = Tensor::new(logits, &Device::Cpu).unwrap();
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[s.sample(&t).unwrap() as usize] += 1;
        }
        counts
    }

    fn params(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: 7,
            ..Default::default()
        }
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        assert_eq!(
            draws(&params(0.0, Some(2), Some(0.5)), &logits, 50),
            [0, 50, 0, 0]
        );
        // next_token's greedy path: the first maximum, as torch.
        let t = Tensor::new(&[[[1.0f32, 3.0, 3.0, 0.0]]], &Device::Cpu).unwrap();
        let mut s = Sampler::new(&params(0.0, None, None), &[]);
        assert_eq!(next_token(&mut s, &t).unwrap(), 1);
    }

    #[test]
    fn top_k_never_leaves_the_k_largest() {
        let logits = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let c = draws(&params(1.0, Some(3), None), &logits, 3000);
        assert_eq!(&c[..3], &[0, 0, 0], "{c:?}");
        assert!(c[3..].iter().all(|&n| n > 0), "{c:?}");
        // Within the k, softmax proportions: p(5)/p(4) = e.
        let ratio = c[5] as f64 / c[4] as f64;
        assert!((ratio - std::f64::consts::E).abs() < 0.35, "{ratio}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.4, 0.3, 0.2, 0.1: p = 0.5 keeps {0.4, 0.3} (the token that reaches p
        // is kept), renormalised to 4/7 and 3/7.
        let logits: Vec<f32> = [0.4f32, 0.3, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let n = 4000;
        let c = draws(&params(1.0, None, Some(0.5)), &logits, n);
        assert_eq!(&c[2..], &[0, 0], "{c:?}");
        let f0 = c[0] as f64 / n as f64;
        assert!((f0 - 4.0 / 7.0).abs() < 0.03, "{f0}");
        // p = 1 keeps everything, at the softmax's frequencies.
        let c = draws(&params(1.0, None, Some(1.0)), &logits, n);
        for (i, want) in [0.4, 0.3, 0.2, 0.1].iter().enumerate() {
            let f = c[i] as f64 / n as f64;
            assert!((f - want).abs() < 0.03, "id {i}: {f} vs {want}");
        }
    }

    #[test]
    fn temperature_scales_the_logits() {
        // At T = 2 the logits [0, ln 4] give p = softmax([0, ln 4] / 2) = [1/3, 2/3].
        let logits = [0.0f32, 4f32.ln()];
        let n = 4000;
        let c = draws(&params(2.0, None, None), &logits, n);
        let f1 = c[1] as f64 / n as f64;
        assert!((f1 - 2.0 / 3.0).abs() < 0.03, "{f1}");
        // Every filtered branch applies it too (top-k, top-p, top-k then top-p): the third logit is cut by
        // k = 2 and by p = 0.999 (its probability is ~1e-5 at T = 2); at T = 1 id 1 would come up 4/5 of the time.
        let logits3 = [0.0f32, 4f32.ln(), -20.0];
        for (k, p) in [(Some(2), None), (None, Some(0.999)), (Some(2), Some(0.999))] {
            let c = draws(&params(2.0, k, p), &logits3, n);
            let f1 = c[1] as f64 / n as f64;
            assert!(
                (f1 - 2.0 / 3.0).abs() < 0.03,
                "top_k {k:?} top_p {p:?}: {f1}"
            );
            assert_eq!(c[2], 0, "top_k {k:?} top_p {p:?}: {c:?}");
        }
        // The same seed draws the same sequence.
        assert_eq!(
            draws(&params(0.8, Some(2), Some(0.9)), &logits, 100),
            draws(&params(0.8, Some(2), Some(0.9)), &logits, 100)
        );
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits_of_recent_ids() {
        let p = SamplingParams {
            repeat: Some(RepeatPenalty {
                penalty: 2.0,
                last_n: 2,
            }),
            ..SamplingParams::greedy()
        };
        // History [0, 1, 3] keeps the last 2: {1, 3}. Id 1: 4 -> 2, id 3: -1 -> -2; 0 untouched.
        let mut s = Sampler::new(&p, &[0, 1, 3]);
        let mut row = [3.0f32, 4.0, 2.5, -1.0];
        assert_eq!(s.pick(&mut row).unwrap(), 0);
        assert_eq!(row, [3.0, 2.0, 2.5, -2.0]);
        // The pick joins the history (now {3, 0}): 0 is penalised next, 1 is not any more.
        let mut row = [3.0f32, 2.9, 0.0, 0.0];
        assert_eq!(s.pick(&mut row).unwrap(), 1);
        assert_eq!(row, [1.5, 2.9, 0.0, 0.0]);
        // Without a penalty greedy is the device-side argmax path.
        assert!(SamplingParams::greedy().is_plain_greedy() && !p.is_plain_greedy());
    }

    #[test]
    fn min_p_drops_tokens_below_a_share_of_the_top_probability() {
        // Probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.5 keeps ids whose p >= 0.25.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let p = SamplingParams {
            min_p: Some(0.5),
            ..params(1.0, None, None)
        };
        let mut s = Sampler::new(&p, &[]);
        let mut c = [0usize; 4];
        for _ in 0..2000 {
            c[s.pick(&mut logits.clone()).unwrap() as usize] += 1;
        }
        assert_eq!(&c[2..], &[0, 0], "{c:?}");
        let f0 = c[0] as f64 / 2000.0;
        assert!((f0 - 0.625).abs() < 0.04, "{f0}");
    }
}
