//! `moe-run serve`: the OpenAI API over HTTP (axum on tokio) on the continuous-batching engine
//! ([`crate::runtime::batch`]). Handlers tokenize, validate and stream; the engine thread owns
//! the model. Loopback by default.

// Requests from the network reach this module: no unwrap/expect/panic/unchecked indexing outside
// tests (checked by `cargo clippy`).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod openai;
pub mod text;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::runtime::batch::{BatchConfig, Engine, Event, Submission, SubmitError};
use crate::runtime::chat::ChatTemplate;
use crate::runtime::generate::{GenerateParams, RepeatPenalty, SamplingParams};
use crate::runtime::tokenizer::TextTokenizer;
use openai::{ApiError, Kind, Limits, Usage};
use text::StopText;

pub struct ServeOptions {
    pub addr: SocketAddr,
    /// The name clients pass as `model` (also listed by /v1/models).
    pub model_id: String,
    pub batch: BatchConfig,
    pub chat: Option<ChatTemplate>,
    /// The default `max_tokens` of /v1/completions (OpenAI's is 16).
    pub default_max_tokens: usize,
}

struct AppState {
    engine: Engine,
    tok: TextTokenizer,
    chat: Option<ChatTemplate>,
    model_id: String,
    context: usize,
    vocab: usize,
    eos: Vec<u32>,
    default_max_tokens: usize,
    created: u64,
    next_id: AtomicU64,
    rejected_full: AtomicU64,
    bad_requests: AtomicU64,
}

type Shared = Arc<AppState>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves until Ctrl-C or SIGTERM: then stops accepting, lets open requests finish, and returns.
/// `on_listen` hears the bound address (with `--port 0`, the port the system chose).
pub fn run(
    model: Model,
    tok: TextTokenizer,
    opts: ServeOptions,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))?;
    let context = model.cfg.max_position_embeddings;
    let vocab = model.cfg.vocab_size;
    let eos = tok.eos.clone();
    let engine = Engine::start(model, opts.batch)?;
    let state = Arc::new(AppState {
        engine,
        tok,
        chat: opts.chat,
        model_id: opts.model_id,
        context,
        vocab,
        eos,
        default_max_tokens: opts.default_max_tokens,
        created: now_secs(),
        next_id: AtomicU64::new(1),
        rejected_full: AtomicU64::new(0),
        bad_requests: AtomicU64::new(0),
    });
    let app = router(state.clone());
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .map_err(|e| Error::io(format!("--host/--port {}", opts.addr), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("listening socket", e))?;
        on_listen(addr);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| Error::io("http server", e))
    })?;
    drop(rt);
    // Every connection has closed: the engine finishes what is left and its thread ends.
    if let Ok(s) = Arc::try_unwrap(state) {
        s.engine.shutdown();
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("moe-run serve: shutting down (open requests finish first)");
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint: see /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics".into(),
                param: None,
                code: None,
            }
        })
        .with_state(state)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_id,
            "object": "model",
            "created": s.created,
            "owned_by": "moe-run",
            "max_model_len": s.context,
        }],
    }))
}

/// Prometheus text exposition.
async fn metrics(State(s): State<Shared>) -> Response {
    use std::fmt::Write;
    let st = s.engine.stats();
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    put(
        "moe_requests_total",
        "counter",
        "Requests admitted to the engine.",
        st.requests_total.load(Relaxed).to_string(),
    );
    put(
        "moe_requests_rejected_queue_full_total",
        "counter",
        "Requests refused because the waiting queue was full (HTTP 429).",
        s.rejected_full.load(Relaxed).to_string(),
    );
    put(
        "moe_requests_bad_total",
        "counter",
        "Requests refused as malformed or out of range (HTTP 400/404).",
        s.bad_requests.load(Relaxed).to_string(),
    );
    put(
        "moe_requests_cancelled_total",
        "counter",
        "Sequences cancelled because their client went away.",
        st.cancelled_total.load(Relaxed).to_string(),
    );
    put(
        "moe_kernel_launches_total",
        "counter",
        "moe-kernels launches of the engine's steps, on CUDA or --device emu (a CUDA graph replay counts as one; candle's own ops are not counted; 0 on the CPU path).",
        st.kernel_launches_total.load(Relaxed).to_string(),
    );
    put(
        "moe_cuda_graph_replays_total",
        "counter",
        "Decode steps replayed as a CUDA graph (serve --cuda-graph).",
        st.graph_replays_total.load(Relaxed).to_string(),
    );
    put(
        "moe_sequences_running",
        "gauge",
        "Sequences in the running batch.",
        st.running.load(Relaxed).to_string(),
    );
    put(
        "moe_sequences_waiting",
        "gauge",
        "Requests waiting for a batch slot or KV memory.",
        st.waiting.load(Relaxed).to_string(),
    );
    put(
        "moe_prompt_tokens_total",
        "counter",
        "Prompt tokens prefilled.",
        st.prompt_tokens_total.load(Relaxed).to_string(),
    );
    put(
        "moe_generation_tokens_total",
        "counter",
        "Tokens generated.",
        st.generated_tokens_total.load(Relaxed).to_string(),
    );
    put(
        "moe_generation_tokens_per_second",
        "gauge",
        "Tokens generated per second over the last second of steps (0 when idle).",
        format!("{:.3}", st.recent_tok_per_s()),
    );
    put(
        "moe_engine_steps_total",
        "counter",
        "Batched forward passes.",
        st.steps_total.load(Relaxed).to_string(),
    );
    put(
        "moe_engine_busy_seconds_total",
        "counter",
        "Wall time spent in forward passes.",
        format!("{:.6}", st.busy_micros.load(Relaxed) as f64 / 1e6),
    );
    put(
        "moe_kv_cache_used_bytes",
        "gauge",
        "KV cache bytes reserved by running sequences (with --cuda-graph, also finished sequences' caches kept for the next request).",
        st.kv_used_bytes.load(Relaxed).to_string(),
    );
    put(
        "moe_kv_cache_budget_bytes",
        "gauge",
        "KV cache budget (--kv-memory).",
        st.kv_budget_bytes.load(Relaxed).to_string(),
    );
    if let Ok(e) = st.experts.lock() {
        if let Some(e) = e.as_ref() {
            let _ = writeln!(out, "# HELP moe_expert_tokens_total Token slots routed to each expert, per MoE layer.\n# TYPE moe_expert_tokens_total counter");
            for l in &e.layers {
                for (i, c) in l.counts.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "moe_expert_tokens_total{{layer=\"{}\",expert=\"{i}\"}} {c}",
                        l.layer
                    );
                }
            }
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn completions(State(s): State<Shared>, body: Bytes) -> Response {
    let r = async {
        let req: openai::CompletionRequest = openai::parse(&body)?;
        check_model(&s, req.common.model.as_deref())?;
        let limits = req.common.limits()?;
        let prompt = match req.prompt {
            openai::PromptInput::Text(t) => encode(&s, &t, true)?,
            openai::PromptInput::Texts(v) if v.len() == 1 => encode(&s, v.concat().as_str(), true)?,
            openai::PromptInput::Ids(ids) => ids,
            openai::PromptInput::IdLists(mut v) if v.len() == 1 => v.pop().unwrap_or_default(),
            _ => return Err(ApiError::bad("prompt: give one prompt (a batch of prompts is not supported; send several requests)", Some("prompt"))),
        };
        Ok::<_, ApiError>((prompt, limits))
    }
    .await;
    respond(s, Kind::Completion, r).await
}

async fn chat_completions(State(s): State<Shared>, body: Bytes) -> Response {
    let r = async {
        let req: openai::ChatRequest = openai::parse(&body)?;
        check_model(&s, req.common.model.as_deref())?;
        let limits = req.common.limits()?;
        let messages = req.messages()?;
        let Some(t) = &s.chat else {
            return Err(ApiError::bad(
                format!("{} has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja): use /v1/completions", s.model_id),
                Some("messages"),
            ));
        };
        let text = t
            .render(&messages, true)
            .map_err(|e| ApiError::bad(format!("the chat template refused the messages: {e}"), Some("messages")))?;
        // The template writes the special tokens itself (as transformers' apply_chat_template).
        let prompt = encode(&s, &text, false)?;
        Ok::<_, ApiError>((prompt, limits))
    }
    .await;
    respond(s, Kind::Chat, r).await
}

fn check_model(s: &AppState, model: Option<&str>) -> std::result::Result<(), ApiError> {
    match model {
        Some(m) if m != s.model_id => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model {m:?} does not exist: this server serves {:?}",
                s.model_id
            ),
            param: Some("model"),
            code: Some("model_not_found"),
        }),
        _ => Ok(()),
    }
}

fn encode(s: &AppState, text: &str, special: bool) -> std::result::Result<Vec<u32>, ApiError> {
    let r = if special {
        s.tok.encode(text)
    } else {
        s.tok.encode_plain(text)
    };
    r.map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: e.to_string(),
        param: None,
        code: None,
    })
}

/// Validates the prompt against the context, submits, and answers (streamed or whole).
async fn respond(
    s: Shared,
    kind: Kind,
    parsed: std::result::Result<(Vec<u32>, Limits), ApiError>,
) -> Response {
    let e = match start(&s, kind, parsed) {
        Ok((rx, req)) if req.limits.stream => return stream(s, rx, req).into_response(),
        Ok((rx, req)) => match whole(&s, rx, &req).await {
            Ok((text, finish, usage)) => {
                let body = openai::full_response(
                    kind,
                    &req.id,
                    &s.model_id,
                    req.created,
                    &text,
                    finish,
                    usage,
                );
                return Json(body).into_response();
            }
            Err(e) => e,
        },
        Err(e) => e,
    };
    match e.status.as_u16() {
        429 | 503 => s.rejected_full.fetch_add(1, Relaxed),
        400..=499 => s.bad_requests.fetch_add(1, Relaxed),
        _ => 0,
    };
    e.into_response()
}

/// An accepted request's bookkeeping.
struct Accepted {
    kind: Kind,
    id: String,
    limits: Limits,
    prompt_tokens: usize,
    created: u64,
}

fn start(
    s: &Shared,
    kind: Kind,
    parsed: std::result::Result<(Vec<u32>, Limits), ApiError>,
) -> std::result::Result<(mpsc::UnboundedReceiver<Event>, Accepted), ApiError> {
    let (prompt, limits) = parsed?;
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty", Some("prompt")));
    }
    if prompt.len() >= s.context {
        return Err(ApiError::bad(
            format!(
                "the prompt has {} tokens; this model's context is {} tokens (max_position_embeddings), so at most {} prompt tokens leave room for one new token",
                prompt.len(),
                s.context,
                s.context - 1
            ),
            Some(if kind == Kind::Chat { "messages" } else { "prompt" }),
        ));
    }
    if let Some((i, id)) = prompt
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= s.vocab)
    {
        return Err(ApiError::bad(
            format!(
                "token id {id} at position {i} is out of range: the vocabulary has {} tokens",
                s.vocab
            ),
            Some("prompt"),
        ));
    }
    let room = s.context - prompt.len();
    let max_new = match (limits.max_tokens, kind) {
        (Some(m), _) => m.min(room),
        (None, Kind::Completion) => s.default_max_tokens.min(room),
        (None, Kind::Chat) => room,
    };
    let params = GenerateParams {
        max_new_tokens: max_new,
        sampling: SamplingParams {
            temperature: limits.temperature,
            top_k: limits.top_k,
            top_p: limits.top_p,
            seed: limits.seed,
            min_p: limits.min_p,
            repeat: limits.repetition_penalty.map(|penalty| RepeatPenalty {
                penalty,
                last_n: s.context,
            }),
        },
        eos: if limits.ignore_eos {
            vec![]
        } else {
            s.eos.clone()
        },
        // The batching engine steps ragged batches (one graph per batch shape is not built).
        cuda_graph: false,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    s.engine
        .submit(Submission {
            prompt,
            params,
            sink: Box::new(move |ev| tx.send(ev).is_ok()),
        })
        .map_err(|e| ApiError {
            status: match e {
                SubmitError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
                SubmitError::TooLarge { .. } => StatusCode::BAD_REQUEST,
                SubmitError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            },
            message: e.to_string(),
            param: matches!(e, SubmitError::TooLarge { .. }).then_some("max_tokens"),
            code: None,
        })?;
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        s.next_id.fetch_add(1, Relaxed)
    );
    Ok((
        rx,
        Accepted {
            kind,
            id,
            limits,
            prompt_tokens,
            created: now_secs(),
        },
    ))
}

/// Reads a request's events to the end: its text, finish reason and usage.
async fn whole(
    s: &AppState,
    mut rx: mpsc::UnboundedReceiver<Event>,
    req: &Accepted,
) -> std::result::Result<(String, &'static str, Usage), ApiError> {
    let mut text = StopText::new(req.limits.stops.clone());
    let mut tokens = 0;
    let mut out = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(id) => {
                tokens += 1;
                out.push_str(&text.push(&s.tok, id).map_err(server_error)?);
                if text.stopped {
                    return Ok((out, "stop", Usage::new(req.prompt_tokens, tokens)));
                }
            }
            Event::Done { stop, .. } => {
                out.push_str(&text.finish());
                return Ok((
                    out,
                    openai::finish_reason(Some(stop)),
                    Usage::new(req.prompt_tokens, tokens),
                ));
            }
            Event::Failed(msg) => return Err(server_error(msg)),
        }
    }
    Err(server_error(
        "the engine stopped before the request finished",
    ))
}

fn server_error(e: impl ToString) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: e.to_string(),
        param: None,
        code: None,
    }
}

/// A streamed answer: server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
/// When the client goes away the stream (and with it the receiver) is dropped, and the engine
/// cancels the sequence at its next token, freeing its KV.
fn stream(
    s: Shared,
    rx: mpsc::UnboundedReceiver<Event>,
    req: Accepted,
) -> Sse<impl futures_util::Stream<Item = std::result::Result<SseEvent, std::convert::Infallible>>>
{
    let st = Streaming {
        text: StopText::new(req.limits.stops.clone()),
        s,
        rx,
        req,
        tokens: 0,
        first: true,
        done: false,
        pending: std::collections::VecDeque::new(),
    };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            st.advance().await;
        }
    });
    Sse::new(events)
}

struct Streaming {
    s: Shared,
    rx: mpsc::UnboundedReceiver<Event>,
    req: Accepted,
    text: StopText,
    tokens: usize,
    first: bool,
    done: bool,
    pending: std::collections::VecDeque<SseEvent>,
}

impl Streaming {
    fn chunk(&mut self, delta: Option<&str>, finish: Option<&str>, usage: Option<Usage>) {
        let first = std::mem::replace(&mut self.first, false);
        let r = &self.req;
        let v = openai::chunk(
            r.kind,
            &r.id,
            &self.s.model_id,
            r.created,
            delta.map(|d| (d, first)),
            finish,
            usage,
        );
        self.pending
            .push_back(SseEvent::default().data(v.to_string()));
    }

    fn finish(&mut self, reason: &str) {
        self.chunk(None, Some(reason), None);
        if self.req.limits.include_usage {
            self.chunk(
                None,
                None,
                Some(Usage::new(self.req.prompt_tokens, self.tokens)),
            );
        }
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
        // A stop string ended it early: the engine cancels the sequence at its next token.
        self.rx.close();
    }

    fn fail(&mut self, msg: String) {
        let e = server_error(msg);
        self.pending
            .push_back(SseEvent::default().data(e.body().to_string()));
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }

    /// Waits for the engine's next event and turns it into chunks.
    async fn advance(&mut self) {
        if self.first && self.req.kind == Kind::Chat {
            self.chunk(Some(""), None, None);
            return;
        }
        match self.rx.recv().await {
            Some(Event::Token(id)) => {
                self.tokens += 1;
                match self.text.push(&self.s.tok, id) {
                    Ok(piece) if !piece.is_empty() => self.chunk(Some(&piece), None, None),
                    Ok(_) => {}
                    Err(e) => return self.fail(e.to_string()),
                }
                if self.text.stopped {
                    self.finish("stop");
                }
            }
            Some(Event::Done { stop, .. }) => {
                let rest = self.text.finish();
                if !rest.is_empty() {
                    self.chunk(Some(&rest), None, None);
                }
                self.finish(openai::finish_reason(Some(stop)));
            }
            Some(Event::Failed(msg)) => self.fail(msg),
            None => self.fail("the engine stopped before the request finished".into()),
        }
    }
}
