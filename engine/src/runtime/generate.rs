//! The generation loop: validate the prompt, prefill it in one forward pass, then decode one
//! token at a time against the KV cache until `max_new_tokens`, EOS, or the context is full.

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::error::{Error, Result};
use crate::model::{Model, Trace};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// <= 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
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

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop after emitting any of these (the EOS token is included in the output).
    pub eos: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    Eos,
    ContextFull,
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
pub fn next_token(sampler: &mut LogitsProcessor, greedy: bool, logits: &Tensor) -> Result<u32> {
    use crate::model::host;
    let logits = logits.flatten_all()?;
    if greedy {
        return Ok(host::read_scalar::<u32>(&logits.argmax(0)?)?);
    }
    let v = logits.dim(0)?;
    let cpu = Tensor::from_vec(host::read_vec::<f32>(&logits)?, v, &Device::Cpu)?;
    Ok(sampler.sample(&cpu)?)
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
    let mut sampler = p.sampling.processor();
    let mut trace = on_trace.as_ref().map(|_| Trace::default());
    let mut generated = Vec::with_capacity(p.max_new_tokens.min(context));
    let device = model.device();

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
        let logits = model.forward(&input, &mut cache, false, trace.as_mut())?; // [1, 1, V]
        let next = next_token(&mut sampler, p.sampling.temperature <= 0.0, &logits)?;
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
        let mut s = params(0.0, None, None).processor();
        assert_eq!(next_token(&mut s, true, &t).unwrap(), 1);
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
}
