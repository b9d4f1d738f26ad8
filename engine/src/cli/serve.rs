//! `moe-run serve`: load the model, size the KV budget, and serve the OpenAI API
//! ([`crate::serve`]) on the continuous-batching engine.

use std::net::{IpAddr, SocketAddr};

use clap::Args;

use super::{load, ModelArgs};
use crate::error::{Error, Result};
use crate::runtime::batch::BatchConfig;
use crate::runtime::tokenizer::TextTokenizer;
use crate::serve::ServeOptions;
use crate::spec::bytes::kv_bytes_per_sequence;
use crate::units::human_bytes;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together in one step at most.
    #[arg(long, default_value_t = 16, value_parser = crate::units::at_least_one)]
    max_batch: usize,
    /// Requests that may wait for a slot; one more gets HTTP 429.
    #[arg(long, default_value_t = 64)]
    max_waiting: usize,
    /// KV cache budget for all running sequences, e.g. 2GiB (default: --max-batch sequences at
    /// the full context, capped at 80% of the free memory of the device).
    #[arg(long, value_parser = crate::units::byte_size)]
    kv_memory: Option<u64>,
    /// Prompt tokens prefilled per step at most, so a long prompt does not stall running
    /// sequences for its whole prefill.
    #[arg(long, default_value_t = 256, value_parser = crate::units::at_least_one)]
    prefill_chunk: usize,
    /// The model name clients pass (default: the --model name, the --weights folder's name, or
    /// tiny-kjv).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Default max_tokens of /v1/completions (OpenAI's default is 16).
    #[arg(long, default_value_t = 16, value_parser = crate::units::at_least_one)]
    default_max_tokens: usize,
    /// Do not count routed experts per layer for /metrics (the count reads each MoE layer's
    /// routing back to the host every step, a sync per layer on a GPU).
    #[arg(long)]
    no_expert_metrics: bool,
    /// Replay the steps where every running sequence decodes one token as CUDA graphs, one set per
    /// batch membership (its KV caches; a finished request's cache is kept for the next request
    /// that fits, so the membership and its graphs stay). Needs --no-expert-metrics (the count
    /// reads routing back every step); where graphs cannot work it says why on stderr once and
    /// steps eagerly.
    #[arg(long)]
    cuda_graph: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    // `--device emu`: on for this thread, so the engine thread it starts runs the emulator too.
    let _emu = super::emu_scope(&a.model)?;
    let (src, model) = load(&a.model)?;
    let tok = TextTokenizer::of_source(&src, &model.cfg)?.ok_or_else(|| {
        Error::Input("serve needs the model's tokenizer.json (none beside its config.json)".into())
    })?;
    // A model without a template still serves completions; chat requests get a clear 400.
    let chat = super::chat::template_of(&src)?;
    let model_id =
        a.served_model_name
            .clone()
            .unwrap_or_else(|| match (&a.model.model, &a.model.weights) {
                (Some(m), _) => m.clone(),
                (None, Some(w)) => w
                    .file_name()
                    .map_or_else(|| w.display().to_string(), |n| n.to_string_lossy().into()),
                (None, None) => "tiny-kjv".into(),
            });
    let context = model.cfg.max_position_embeddings;
    let per_seq = kv_bytes_per_sequence(
        &model.cfg,
        context as u64,
        model.dtype().size_in_bytes() as u64,
    );
    let kv_budget = kv_budget(a.kv_memory, per_seq, a.max_batch, model.device())?;
    let full = kv_budget / per_seq.max(1);
    let template = match &chat {
        Some(_) => "chat template: yes",
        None => "no chat template (chat completions refused)",
    };
    let summary = format!(
        "model {model_id} | max batch {} | KV budget {} ({full} sequences at the full context of {context} tokens, more when shorter) | prefill chunk {} | {template}",
        a.max_batch,
        human_bytes(kv_budget),
        a.prefill_chunk
    );
    let opts = ServeOptions {
        addr: SocketAddr::new(a.host, a.port),
        model_id,
        batch: BatchConfig {
            max_batch: a.max_batch,
            max_waiting: a.max_waiting,
            kv_budget,
            prefill_chunk: a.prefill_chunk,
            expert_stats: !a.no_expert_metrics,
            cuda_graph: a.cuda_graph,
        },
        chat,
        default_max_tokens: a.default_max_tokens,
    };
    crate::serve::run(model, tok, opts, |addr| {
        eprintln!("{summary}");
        // Tests and scripts read the port from this line (with --port 0).
        eprintln!("moe-run serve: listening on http://{addr}");
    })
}

/// The KV budget: `--kv-memory` (refused beyond what the device has free), else enough for
/// `max_batch` sequences at the full context, capped at 80% of the free memory.
fn kv_budget(
    asked: Option<u64>,
    per_seq: u64,
    max_batch: usize,
    device: &candle_core::Device,
) -> Result<u64> {
    let free = match device {
        candle_core::Device::Cpu => crate::memory::host_memory(),
        d => crate::memory::device_memory(d),
    }
    .map(|(free, _)| free);
    let budget = match (asked, free) {
        (Some(b), Some(f)) if b > f => {
            return Err(Error::Input(format!(
                "--kv-memory {} is more than the {} free on this device",
                human_bytes(b),
                human_bytes(f)
            )))
        }
        (Some(b), _) => b,
        (None, f) => {
            let want = per_seq.saturating_mul(max_batch as u64);
            f.map_or(want, |f| want.min(f / 5 * 4))
        }
    };
    if budget == 0 {
        return Err(Error::Input(
            "--kv-memory 0 leaves no room for any sequence".into(),
        ));
    }
    Ok(budget)
}
