//! The `moe-run` command line: clap arguments, validated where they are parsed, and the
//! orchestration of each subcommand. Errors print as one `error: ...` line (a cause line only
//! when it adds something) with exit status 1; usage errors exit with 2.

// User input reaches this module: no unwrap/expect/panic/unchecked indexing outside tests
// (checked by `cargo clippy`; a proven-safe exception carries its own `allow` and reason).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod analyze;
pub mod chat;
pub mod profile;
pub mod results;
pub mod serve;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::Tensor;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::loader::{self, LoadOptions, ModelSource};
use crate::memory::peak_rss_bytes;
use crate::model::{Model, Trace};
use crate::runtime::generate::{
    generate, validate_prompt, GenerateParams, RepeatPenalty, SamplingParams,
};
use crate::runtime::stats::RoutingStats;
use crate::runtime::tokenizer::{TextStream, TextTokenizer};
use crate::units::human_bytes;

#[derive(Parser)]
#[command(
    name = "moe-run",
    version,
    about = "Run and measure sparse Mixture-of-Experts transformers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
    /// Compute threads on the CPU, for every command (default: RAYON_NUM_THREADS, else the
    /// physical cores this process may use). One pool, sized once.
    #[arg(short = 't', long, global = true, value_parser = crate::units::at_least_one)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Print the model's logits for a prompt of token ids as JSON: {"ids":[..],"logits":[[..]..]}.
    Logits(LogitsArgs),
    /// Exact parameter, memory, KV and FLOP accounting from the config alone, decode/prefill
    /// ceilings on GPUs, the seed articles' formulas and --claims (no weights needed).
    Analyze(analyze::AnalyzeArgs),
    /// Measure prefill/decode tokens/s and memory next to `analyze`'s predictions and the
    /// roofline; --random-weights builds any known model from its config; --sweep
    /// experts|topk|batch on a small random Mixtral.
    Bench(crate::bench::BenchArgs),
    /// Write an INT8/INT4/MXFP4 weight-only quantized copy of a checkpoint (loads without re-quantizing).
    Quantize(QuantizeArgs),
    /// Check the CUDA kernels (on cuda, or their source on the CPU with emu; on cpu, the harness) against
    /// their CPU references.
    Selftest(SelftestArgs),
    /// Check (or --write) README.md's results table against benches/results/*.json.
    Results(crate::cli::results::ResultsArgs),
    /// Count which routed experts a text's tokens choose, per layer (JSON), for the hybrid
    /// placement's --profile; reports how concentrated routing is.
    Profile(profile::ProfileArgs),
    /// Serve the OpenAI API (/v1/completions, /v1/chat/completions, streaming) with continuous
    /// batching; with no --model, the embedded tiny-kjv.
    Serve(serve::ServeArgs),
    /// Chat in the terminal through the model's chat template (history kept; /reset; Ctrl-D
    /// exits).
    Chat(chat::ChatArgs),
}

#[derive(Args)]
pub struct SelftestArgs {
    /// cpu, cuda[:N] (a build with the `cuda` feature), or emu: the kernels' own CUDA source
    /// compiled for the CPU (a build with the `emu` feature, needs g++).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Only the ops whose name contains this (route, dispatch, experts, combine, rms_norm,
    /// qmatmul, qmatmul_moe, qk_norm_rope, decode_attention, or model for whole-model parity).
    #[arg(long)]
    filter: Option<String>,
    /// Parity fixtures for the whole-model cases (default: tests/fixtures when it exists here).
    #[arg(long)]
    fixtures: Option<PathBuf>,
}

fn selftest(a: SelftestArgs) -> Result<()> {
    let fixtures = a.fixtures.or_else(|| {
        let d = PathBuf::from("tests/fixtures");
        d.is_dir().then_some(d)
    });
    let target = moe_kernels::selftest::Target::parse(&a.device, |d| {
        loader::parse_device(d).map_err(|e| candle_core::Error::Msg(e.to_string()))
    })?;
    let report = crate::selftest::run(&target, a.filter.as_deref(), fixtures.as_deref())?;
    crate::fsio::print(&report.table())?;
    Ok(report.ensure_passed()?)
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// `tiny-kjv` (the embedded model, also the default), a known model name (see configs/),
    /// a Hugging Face repo id ORG/NAME (the local HF cache, else downloaded into it; HF_TOKEN,
    /// HF_ENDPOINT, HF_HUB_OFFLINE apply) or a local folder (read as --weights).
    #[arg(short = 'm', long, conflicts_with = "weights")]
    model: Option<String>,
    /// The Hub revision of --model: a branch, tag or commit (default main).
    #[arg(long, requires = "model", value_parser = crate::loader::hub::parse_revision)]
    revision: Option<String>,
    /// A directory with config.json, safetensors weights and (for text) tokenizer.json.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Compute dtype: auto (f32 on the CPU, bf16 on a GPU), f32, bf16 or f16. On the CPU, auto
    /// also keeps the linear and expert weights of a checkpoint stored in bf16 (or f16) 16-bit
    /// (as `--weight-dtype bf16`).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Dtype of the linear and expert weights when it differs from the compute dtype: on the CPU,
    /// `--dtype f32 --weight-dtype bf16` keeps them 16-bit in memory, read in place by the CPU
    /// kernels (half the bytes per token of f32; what llama.cpp does with a bf16 GGUF).
    /// `--weight-dtype f32` widens them under `--dtype auto`.
    #[arg(long)]
    weight_dtype: Option<String>,
    /// auto (the first GPU when this build has CUDA and one is present, else the CPU; a line
    /// on stderr says which), cpu, cuda[:N] in a build with the `cuda` feature, or emu: the CPU
    /// with every op through its CUDA kernel's own source, emulated (a build with the `emu`
    /// feature; slow: for checking the kernel path's logits on a real checkpoint).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Weight-only quantization applied while loading: int8, int4 (group 128), int4:64, int4:32, mxfp4.
    #[arg(long)]
    quant: Option<String>,
    /// Hybrid placement: keep the routed experts of the first N MoE layers in host memory, run
    /// by the CPU kernels (on `--device cpu` this exercises the split itself).
    #[arg(long, value_name = "N")]
    n_cpu_moe: Option<usize>,
    /// Hybrid placement: the device memory budget, e.g. 24GiB; routed experts that do not fit
    /// stay in host memory (default without it: the device's free memory minus a margin).
    #[arg(long, value_parser = crate::units::byte_size)]
    gpu_memory: Option<u64>,
    /// Hybrid placement from a routing profile (`moe-run profile`): hottest experts on the device.
    #[arg(long, value_name = "FILE", conflicts_with = "n_cpu_moe")]
    profile: Option<PathBuf>,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// The dense (f32/f16/bf16) checkpoint directory.
    #[arg(long)]
    weights: PathBuf,
    /// int8, int4 (group 128), int4:64, int4:32 or mxfp4.
    #[arg(long)]
    quant: String,
    /// Output directory (model.safetensors, config.json with quantization_config, tokenizer):
    /// never the input folder or a Hugging Face cache; it appears only once complete.
    #[arg(long)]
    out: PathBuf,
    /// Replace the files of an existing, non-empty output directory.
    #[arg(long)]
    force: bool,
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    let fmt = crate::quant::parse_quant(&a.quant)?
        .ok_or_else(|| Error::Input("--quant none writes nothing; use int8 or int4".into()))?;
    let r = crate::loader::save::quantize_checkpoint(&a.weights, &a.out, fmt, a.force)?;
    eprintln!(
        "wrote {} ({} tensors, {}): quantized linears {} (from {} dense)",
        a.out.join("model.safetensors").display(),
        r.tensors,
        human_bytes(r.file_bytes),
        human_bytes(r.quantized_bytes),
        human_bytes(r.replaced_bytes),
    );
    Ok(())
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text prompt (needs tokenizer.json).
    #[arg(short = 'p', long, group = "input")]
    prompt: Option<String>,
    /// The prompt's text from a file; `-` reads standard input.
    #[arg(short = 'f', long, value_name = "FILE", group = "input")]
    prompt_file: Option<PathBuf>,
    /// One user message, rendered through the model's chat template (with --system) and
    /// answered until the template's end-of-turn token.
    #[arg(long = "chat", value_name = "MESSAGE", group = "input")]
    chat_message: Option<String>,
    /// The system message of --chat.
    #[arg(long)]
    system: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', group = "input")]
    ids: Option<Vec<u32>>,
    /// Tokens to generate; 0 runs the prompt's forward pass only (prefill timing).
    #[arg(short = 'n', long, visible_alias = "n-predict", default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature, >= 0; 0 = greedy.
    #[arg(long, visible_alias = "temp", default_value_t = 0.8, value_parser = crate::units::temperature)]
    temperature: f64,
    /// Min-p sampling: drop tokens less likely than P times the most likely one (0 < P <= 1).
    #[arg(long, value_parser = crate::units::top_p)]
    min_p: Option<f64>,
    /// Repetition penalty on the last --repeat-last-n tokens (> 0; 1 = off), as llama.cpp.
    #[arg(long, default_value_t = 1.0, value_parser = crate::units::positive_f32)]
    repeat_penalty: f32,
    /// Tokens the repetition penalty looks back over (prompt included).
    #[arg(long, default_value_t = 64, value_parser = crate::units::at_least_one)]
    repeat_last_n: usize,
    /// Context size: prompt plus generated tokens at most (default and maximum: the model's
    /// max_position_embeddings). The KV cache is sized for what the run needs, never more.
    #[arg(short = 'c', long, value_parser = crate::units::at_least_one)]
    ctx_size: Option<usize>,
    /// Sample only among the K most likely tokens (K >= 1).
    #[arg(long, value_parser = crate::units::at_least_one)]
    top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches P (0 < P <= 1).
    #[arg(long, default_value_t = 0.95, value_parser = crate::units::top_p)]
    top_p: f64,
    #[arg(short = 's', long, default_value_t = 42)]
    seed: u64,
    /// Keep generating past the end-of-sequence token (benchmarks, parity checks).
    #[arg(long)]
    ignore_eos: bool,
    /// Replay each decode step as a CUDA graph (captured per attention key bound) instead of
    /// launching its kernels one by one; where the step cannot be replayed it says why on stderr
    /// and decodes eagerly. Not with --stats (which reads routing back every step).
    #[arg(long)]
    cuda_graph: bool,
    /// After generation, print per-layer expert load (token slots per expert, max/mean
    /// imbalance) and the KV cache size per token; with --json they go into the JSON.
    #[arg(long)]
    stats: bool,
    /// Print {"prompt_ids":[..],"generated_ids":[..]} instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
}

/// The command line, where the generation flags (`--model`, `--prompt`, ..) are refused next to a
/// subcommand, and the global `--threads` is taken on either side of one. (clap's
/// `args_conflicts_with_subcommands` would also refuse `moe-run --threads 2 bench`.)
fn parse_cli() -> Cli {
    use clap::{parser::ValueSource, CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    if let Some((sub, _)) = matches.subcommand() {
        let given = matches.ids().map(|id| id.as_str()).find(|id| {
            *id != "threads" && matches.value_source(id) == Some(ValueSource::CommandLine)
        });
        if let Some(id) = given {
            Cli::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("--{id} is an option of `moe-run` without a subcommand; it cannot be used with `{sub}`"),
                )
                .exit();
        }
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Parses the arguments, runs the command and reports its error.
pub fn main() -> ExitCode {
    crate::runtime::tokenizer::quiet_guarded_panics();
    let cli = parse_cli();
    // Before anything else starts a thread.
    crate::memory::configure_allocator();
    if let Err(e) = moe_kernels::cpu::configure_threads(cli.threads) {
        eprintln!("error: --threads: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.cmd {
        // The server runs its own threads: the engine's on the compute pool, HTTP on tokio.
        Some(Cmd::Serve(a)) => serve::run(a),
        cmd => moe_kernels::cpu::on_pool(move || match cmd {
            Some(Cmd::Logits(a)) => logits(a),
            Some(Cmd::Analyze(a)) => analyze::run(&a),
            Some(Cmd::Bench(a)) => crate::bench::run(&a),
            Some(Cmd::Quantize(a)) => quantize(a),
            Some(Cmd::Selftest(a)) => selftest(a),
            Some(Cmd::Results(a)) => crate::cli::results::run(&a),
            Some(Cmd::Profile(a)) => profile::run(a),
            Some(Cmd::Serve(a)) => serve::run(a),
            Some(Cmd::Chat(a)) => chat::run(a),
            None => run(cli.run),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `moe-run ... | head`: the reader has gone, which is not an error of ours.
        Err(Error::Io { path, source })
            if path.as_os_str() == "stdout" && source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// `error: <what and where>`, then a `caused by:` line for each cause whose text the lines
/// before it do not already say.
pub fn error_text(e: &Error) -> String {
    let mut msg = format!("error: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let line = s.to_string();
        if !msg.contains(&line) {
            msg.push_str(&format!("\n  caused by: {line}"));
        }
        src = s.source();
    }
    msg
}

/// For `--device emu`, the emulator turned on for this thread (the caller holds it while the
/// model runs, before [`load`]); `None` for the other devices.
pub(crate) fn emu_scope(a: &ModelArgs) -> Result<Option<moe_kernels::emu::Scope>> {
    if a.device != "emu" {
        return Ok(None);
    }
    moe_kernels::emu::enable()
        .map(Some)
        .map_err(|e| Error::Input(format!("--device emu: {e}")))
}

/// Where the model comes from, and the loaded model.
pub(crate) fn load(a: &ModelArgs) -> Result<(ModelSource, Model)> {
    let src = ModelSource::resolve_at(
        a.model.as_deref(),
        a.weights.as_deref(),
        a.revision.as_deref(),
    )?;
    // `--device emu`: the CPU, with the kernel path run by the emulator on this thread.
    let emu = a.device == "emu";
    if emu && !moe_kernels::emu::active() {
        return Err(Error::Input(
            "--device emu: the emulator is not on for this command (emu_scope before load)".into(),
        ));
    }
    let device = match emu {
        true => candle_core::Device::Cpu,
        false => loader::parse_device(&a.device)?,
    };
    // Only a CUDA build has a choice to report; a CPU-only build always runs on the CPU.
    if a.device == "auto" && cfg!(feature = "cuda") {
        let why = if device.is_cpu() {
            " (no CUDA device answered)"
        } else {
            ""
        };
        eprintln!(
            "device: {}{why} (--device auto)",
            crate::memory::device_name(&device)
        );
    }
    let dtype = loader::parse_dtype_on(&a.dtype, &device)?;
    let quant = crate::quant::parse_quant_flag(a.quant.as_deref())?;
    let weight_dtype = match a.weight_dtype.as_deref() {
        None => src.auto_weight_dtype(&a.dtype, &device, quant)?,
        w => loader::parse_weight_dtype(w, dtype, &device, quant)?,
    };
    let placement = placement_of(a, &src, &device, dtype, weight_dtype, quant)?;
    let opts = LoadOptions {
        dtype,
        weight_dtype,
        placement,
        device,
        progress: true,
        quant,
    };
    let mut model = src.load(&opts)?;
    if emu {
        model.set_exec_path(crate::model::ExecPath::Kernels);
    }
    Ok((src, model))
}

/// The hybrid placement `--n-cpu-moe`, `--gpu-memory` or `--profile` ask for
/// ([`loader::placement_for`]), announced on stderr; `None` without them.
fn placement_of(
    a: &ModelArgs,
    src: &ModelSource,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    weight_dtype: Option<candle_core::DType>,
    quant: Option<crate::quant::QFormat>,
) -> Result<Option<Vec<Option<Vec<bool>>>>> {
    let req = loader::PlacementArgs {
        n_cpu_moe: a.n_cpu_moe,
        gpu_memory: a.gpu_memory,
        profile: a.profile.as_deref(),
    };
    if req.n_cpu_moe.is_none() && req.gpu_memory.is_none() && req.profile.is_none() {
        return Ok(None);
    }
    let cfg = src.config()?;
    let precision = crate::analysis::Precision::with_weights(dtype, weight_dtype, quant);
    let context = (cfg.max_position_embeddings as u64).min(4096);
    Ok(
        loader::placement_for(&cfg, precision, device, &req, context, 1)?
            .map(|plan| plan.per_layer(cfg.num_layers())),
    )
}

#[derive(Serialize)]
struct LogitsOut {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn logits(a: LogitsArgs) -> Result<()> {
    let _emu = emu_scope(&a.model)?;
    let (_, model) = load(&a.model)?;
    validate_prompt(&model, &a.ids)?;
    let mut cache = model.new_cache(1, a.ids.len())?;
    let input = Tensor::new(a.ids.as_slice(), model.device())?.unsqueeze(0)?;
    let logits = model
        .forward(&input, &mut cache, true, None)?
        .squeeze(0)?
        .to_vec2::<f32>()?;
    print_json(&LogitsOut { ids: a.ids, logits })
}

#[derive(Serialize)]
struct RunOut<'a> {
    prompt_ids: &'a [u32],
    generated_ids: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    routing: Option<&'a RoutingStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_cache_bytes_per_token: Option<usize>,
}

fn run(a: RunArgs) -> Result<()> {
    if a.system.is_some() && a.chat_message.is_none() {
        return Err(Error::Input(
            "--system is the system message of --chat MESSAGE; give --chat too".into(),
        ));
    }
    // Read before the model loads, so a missing file fails at once.
    let file = match &a.prompt_file {
        None => None,
        Some(f) if f.as_os_str() == "-" => {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
                .map_err(|e| Error::io("--prompt-file - (stdin)", e))?;
            Some(t)
        }
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Error::Input(format!("--prompt-file {}: {e}", f.display())))?,
        ),
    };
    let _emu = emu_scope(&a.model)?;
    let (src, model) = load(&a.model)?;
    // Text in needs the tokenizer; text out uses it when there is one (else ids are printed).
    let tokenizer = TextTokenizer::of_source(&src, &model.cfg)?;
    let (prompt, echo) = prompt_text(&a, file, &src)?;
    if let (Some(_), None, ModelSource::Dir(dir)) = (&prompt, &tokenizer, &src) {
        return Err(Error::Input(format!(
            "{} has no tokenizer.json, so a text prompt cannot be encoded; give token ids with --ids",
            dir.display()
        )));
    }
    let prompt_ids = match (&prompt, &a.ids, &tokenizer) {
        (Some(text), _, _) if text.is_empty() => {
            return Err(Error::Input("the prompt is empty: give some text".into()))
        }
        // A rendered chat template carries its own special tokens.
        (Some(text), _, Some(tok)) if a.chat_message.is_some() => tok.encode_plain(text)?,
        (Some(text), _, Some(tok)) => tok.encode(text)?,
        (None, Some(ids), _) => ids.clone(),
        _ => {
            return Err(Error::Input(
                "give --prompt TEXT, --prompt-file FILE, --chat MESSAGE or --ids 1,2,3".into(),
            ))
        }
    };
    // Refuse a prompt that cannot run (too long, ids out of range) before echoing anything.
    validate_prompt(&model, &prompt_ids)?;
    let context = model.cfg.max_position_embeddings;
    let max_new_tokens = match a.ctx_size {
        Some(c) if c > context => {
            return Err(Error::Input(format!(
                "--ctx-size {c} is larger than the model's context of {context} tokens (max_position_embeddings)"
            )))
        }
        Some(c) if prompt_ids.len() > c => {
            return Err(Error::Input(format!(
                "the prompt has {} tokens, more than --ctx-size {c}",
                prompt_ids.len()
            )))
        }
        Some(c) => a.max_new_tokens.min(c - prompt_ids.len()),
        None => a.max_new_tokens,
    };
    let eos = match &tokenizer {
        _ if a.ignore_eos => vec![],
        Some(t) => t.eos.clone(),
        None => model.cfg.eos_token_ids.clone(),
    };
    let params = GenerateParams {
        max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: Some(a.top_p),
            seed: a.seed,
            min_p: a.min_p,
            repeat: (a.repeat_penalty != 1.0).then_some(RepeatPenalty {
                penalty: a.repeat_penalty,
                last_n: a.repeat_last_n,
            }),
        },
        eos,
        cuda_graph: a.cuda_graph,
    };

    let mut stats = a.stats.then(|| RoutingStats::new(&model.cfg));
    let mut record = |t: &Trace| {
        if let Some(s) = stats.as_mut() {
            s.record(t)
        }
    };
    let on_trace: Option<&mut dyn FnMut(&Trace)> = if a.stats { Some(&mut record) } else { None };
    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout().lock();
    if let (false, true, Some(text)) = (a.json, echo, &prompt) {
        // The prompt is echoed as given; the continuation streams after it.
        write!(stdout, "{text}")
            .and_then(|_| stdout.flush())
            .map_err(|e| Error::io("stdout", e))?;
    }
    let g = generate(
        &model,
        &prompt_ids,
        &params,
        |id| {
            let piece = match (a.json, &tokenizer) {
                (true, _) => None,
                // A chat reply ends at its end-of-turn token, which is not printed.
                (false, Some(tok)) if a.chat_message.is_some() && tok.eos.contains(&id) => None,
                (false, Some(tok)) => stream.push(tok, id)?,
                (false, None) => Some(format!("{id} ")),
            };
            if let Some(piece) = piece {
                write!(stdout, "{piece}")
                    .and_then(|_| stdout.flush())
                    .map_err(|e| Error::io("stdout", e))?;
            }
            Ok(())
        },
        on_trace,
    )?;
    let kv_per_token = a.stats.then_some(g.kv_cache_bytes_per_token);
    if a.json {
        drop(stdout);
        print_json(&RunOut {
            prompt_ids: &g.prompt_ids,
            generated_ids: &g.generated_ids,
            routing: stats.as_ref(),
            kv_cache_bytes_per_token: kv_per_token,
        })?;
    } else {
        writeln!(stdout).map_err(|e| Error::io("stdout", e))?;
        drop(stdout);
        if let (Some(st), Some(kv)) = (&stats, kv_per_token) {
            eprint!("{}", st.table());
            let c = &model.cfg;
            let per_layer = match c.mla {
                Some(m) => format!(
                    "MLA latent {} + rope key {} per layer",
                    m.kv_lora_rank, m.qk_rope_head_dim
                ),
                None => format!(
                    "K and V of {} heads x {} dims per layer",
                    c.num_kv_heads, c.head_dim
                ),
            };
            eprintln!(
                "KV cache: {kv} bytes per token, measured from the allocated cache ({} layers, {per_layer}, {:?})",
                c.num_layers(),
                model.dtype()
            );
        }
    }
    // Only measured rates are printed; on the emulator they are the emulator's, not a GPU's.
    let emu = if moe_kernels::emu::active() {
        " (emulated kernels)"
    } else {
        ""
    };
    let rate = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.1} tok/s{emu}"));
    eprintln!(
        "prompt {} tokens | prefill {} | decode {} ({} tokens, stop: {}) | weights {} | KV cache {} | peak RSS {}",
        g.prompt_ids.len(),
        rate(g.prefill_tok_per_s()),
        rate(g.decode_tok_per_s()),
        g.generated_ids.len(),
        g.stop,
        human_bytes(model.weight_bytes() as u64),
        human_bytes(g.kv_cache_bytes as u64),
        peak_rss_bytes().map_or("n/a".into(), human_bytes),
    );
    Ok(())
}

/// The text prompt of a run and whether it is echoed: `--prompt`, `--prompt-file`'s text or `--chat` rendered through the model's template (not echoed); `None` with `--ids`.
fn prompt_text(
    a: &RunArgs,
    file: Option<String>,
    src: &ModelSource,
) -> Result<(Option<String>, bool)> {
    if let Some(p) = &a.prompt {
        return Ok((Some(p.clone()), true));
    }
    if let Some(text) = file {
        return Ok((Some(text), true));
    }
    let Some(msg) = &a.chat_message else {
        return Ok((None, false));
    };
    let template = chat::template_of(src)?.ok_or_else(|| {
        Error::Input(
            "--chat: this model has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja); use --prompt".into(),
        )
    })?;
    let mut messages: Vec<_> = a
        .system
        .iter()
        .map(|s| crate::runtime::chat::ChatMessage {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    messages.push(crate::runtime::chat::ChatMessage {
        role: "user".into(),
        content: msg.clone(),
    });
    Ok((Some(template.render(&messages, true)?), false))
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    let text =
        serde_json::to_string(v).map_err(|e| Error::io("stdout", std::io::Error::other(e)))?;
    crate::fsio::print(&(text + "\n"))
}
