//! `moe-run chat`: an interactive terminal chat through the model's own chat template. Each turn
//! re-renders the whole history (as transformers' apply_chat_template does), generates until an
//! end-of-turn token, and keeps the reply in the history. `/reset` clears it; Ctrl-D exits.

use std::io::{BufRead, Write};

use clap::Args;

use super::{load, ModelArgs};
use crate::error::{Error, Result};
use crate::loader::ModelSource;
use crate::runtime::chat::{ChatMessage, ChatTemplate};
use crate::runtime::generate::{generate, validate_prompt, GenerateParams, SamplingParams};
use crate::runtime::tokenizer::{TextStream, TextTokenizer};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message at the start of the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Tokens per reply at most.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Sampling temperature, >= 0; 0 = greedy.
    #[arg(long, default_value_t = 0.7, value_parser = crate::units::temperature)]
    temperature: f64,
    /// Sample only among the K most likely tokens (K >= 1).
    #[arg(long, value_parser = crate::units::at_least_one)]
    top_k: Option<usize>,
    /// Nucleus sampling (0 < P <= 1).
    #[arg(long, default_value_t = 0.95, value_parser = crate::units::top_p)]
    top_p: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Replay each decode step as a captured CUDA graph (as for run).
    #[arg(long)]
    cuda_graph: bool,
}

/// The model's chat template (`None`: it has none).
pub(crate) fn template_of(src: &ModelSource) -> Result<Option<ChatTemplate>> {
    match src {
        ModelSource::Dir(dir) => ChatTemplate::from_dir(dir),
        ModelSource::Embedded(e) => {
            ChatTemplate::from_tokenizer_config_str(e.tokenizer_config, None)
        }
    }
}

pub fn run(a: ChatArgs) -> Result<()> {
    let _emu = super::emu_scope(&a.model)?;
    let (src, model) = load(&a.model)?;
    let tok = TextTokenizer::of_source(&src, &model.cfg)?
        .ok_or_else(|| Error::Input("chat needs the model's tokenizer.json".into()))?;
    let template = template_of(&src)?.ok_or_else(|| {
        Error::Input(
            "this model has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja): use --prompt".into(),
        )
    })?;
    let base: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    let mut history = base.clone();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let out = |s: &str| -> Result<()> {
        let mut o = std::io::stdout().lock();
        write!(o, "{s}")
            .and_then(|_| o.flush())
            .map_err(|e| Error::io("stdout", e))
    };
    eprintln!("chat with the model's template; /reset clears the history, Ctrl-D exits");
    let mut turn = 0u64;
    loop {
        out("> ")?;
        let Some(line) = lines.next() else {
            out("\n")?;
            return Ok(());
        };
        let line = line.map_err(|e| Error::io("stdin", e))?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if text == "/reset" {
            history = base.clone();
            eprintln!("(history cleared)");
            continue;
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: text.to_string(),
        });
        let rendered = template.render(&history, true)?;
        let ids = tok.encode_plain(&rendered)?;
        if let Err(e) = validate_prompt(&model, &ids) {
            history.pop();
            eprintln!("error: {e} (use /reset to start over)");
            continue;
        }
        let params = GenerateParams {
            max_new_tokens: a
                .max_new_tokens
                .min(model.cfg.max_position_embeddings - ids.len()),
            sampling: SamplingParams {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: Some(a.top_p),
                seed: a.seed.wrapping_add(turn),
                ..Default::default()
            },
            eos: tok.eos.clone(),
            cuda_graph: a.cuda_graph,
        };
        turn += 1;
        let mut stream = TextStream::default();
        let mut reply = String::new();
        let g = generate(
            &model,
            &ids,
            &params,
            |id| {
                if tok.eos.contains(&id) {
                    return Ok(());
                }
                if let Some(piece) = stream.push(&tok, id)? {
                    reply.push_str(&piece);
                    out(&piece)?;
                }
                Ok(())
            },
            None,
        )?;
        out("\n")?;
        let rate = g
            .decode_tok_per_s()
            .map_or("n/a".to_string(), |r| format!("{r:.1} tok/s"));
        eprintln!(
            "(prompt {} tokens with the history | reply {} tokens, stop: {} | decode {rate})",
            ids.len(),
            g.generated_ids.len(),
            g.stop
        );
        history.push(ChatMessage {
            role: "assistant".into(),
            content: reply,
        });
    }
}
