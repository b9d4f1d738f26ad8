//! The OpenAI request and response shapes of `/v1/completions` and `/v1/chat/completions`, their
//! validation, and the error body (`{"error": {"message", "type", "param", "code"}}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::runtime::chat::ChatMessage;
use crate::runtime::generate::StopReason;

/// An error as the OpenAI API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param,
            code: None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            429 | 503 => "server_overloaded",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `prompt`: a string, or a list of one string, or token ids (a list, or a list of one list).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: a string or up to 4 strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share (sampling and limits).
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; vLLM and llama.cpp take it. -1 or 0: off.
    pub top_k: Option<i64>,
    /// vLLM's and llama.cpp's min-p (0 < min_p <= 1; 0 = off).
    pub min_p: Option<f64>,
    /// vLLM's repetition penalty over the prompt and the generated tokens (> 0; 1 = off).
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopInput>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    /// vLLM's extension: keep going past end-of-sequence.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub common: Common,
}

/// A chat message's `content`: a string or a list of parts of which only text is supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<MessageIn>,
    #[serde(flatten)]
    pub common: Common,
}

/// Parses a JSON body; any failure is a 400 naming what was wrong.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the request body is not valid JSON"
        } else {
            "the request does not match the API"
        };
        ApiError::bad(format!("{what}: {e}"), None)
    })
}

/// Validated sampling and limits of a request.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f32>,
    pub seed: u64,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

impl Common {
    /// Checks every field's range (OpenAI's: temperature 0..=2, top_p in (0, 1], n = 1, at most 4
    /// stop strings) and the unsupported options.
    pub fn limits(&self) -> Result<Limits, ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::bad(
                format!("n = {n}: only n = 1 is supported"),
                Some("n"),
            ));
        }
        if let Some(b) = self.best_of.filter(|&b| b != 1) {
            return Err(ApiError::bad(
                format!("best_of = {b}: only 1 is supported"),
                Some("best_of"),
            ));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
        {
            return Err(ApiError::bad(
                "logprobs are not supported",
                Some("logprobs"),
            ));
        }
        if self.echo == Some(true) {
            return Err(ApiError::bad("echo is not supported", Some("echo")));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(m) if m >= 1 => Some(m as usize),
            Some(m) => {
                return Err(ApiError::bad(
                    format!("max_tokens = {m}: it must be at least 1"),
                    Some("max_tokens"),
                ))
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                format!("temperature = {temperature}: it must be between 0 and 2"),
                Some("temperature"),
            ));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(ApiError::bad(
                format!("top_p = {p}: it must be greater than 0 and at most 1"),
                Some("top_p"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k >= 1 => Some(k as usize),
            Some(k) => {
                return Err(ApiError::bad(
                    format!("top_k = {k}: it must be at least 1 (or -1 / 0 for no limit)"),
                    Some("top_k"),
                ))
            }
        };
        let min_p = match self.min_p {
            None => None,
            Some(0.0) => None,
            Some(p) if p > 0.0 && p <= 1.0 => Some(p),
            Some(p) => {
                return Err(ApiError::bad(
                    format!("min_p = {p}: it must be between 0 and 1"),
                    Some("min_p"),
                ))
            }
        };
        let repetition_penalty = match self.repetition_penalty {
            None => None,
            Some(1.0) => None,
            Some(r) if r > 0.0 && r.is_finite() => Some(r as f32),
            Some(r) => {
                return Err(ApiError::bad(
                    format!("repetition_penalty = {r}: it must be greater than 0 (1 = off)"),
                    Some("repetition_penalty"),
                ))
            }
        };
        let stops = match &self.stop {
            None => vec![],
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) if v.len() > 4 => {
                return Err(ApiError::bad(
                    format!("{} stop sequences: at most 4 are allowed", v.len()),
                    Some("stop"),
                ))
            }
            Some(StopInput::Many(v)) => v.clone(),
        };
        let seed = match self.seed {
            None => rand_seed(),
            Some(s) => s as u64,
        };
        Ok(Limits {
            max_tokens,
            temperature,
            top_p: self.top_p,
            top_k,
            min_p,
            repetition_penalty,
            seed,
            stops,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            ignore_eos: self.ignore_eos,
        })
    }
}

/// A seed for a request that gave none: different per request.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

impl ChatRequest {
    /// The messages as the chat template takes them (text parts joined).
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad(
                "messages is empty: give at least one message",
                Some("messages"),
            ));
        }
        self.messages
            .iter()
            .map(|m| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut s = String::new();
                        for p in parts {
                            match (&*p.kind, &p.text) {
                                ("text", Some(t)) => s.push_str(t),
                                (k, _) => {
                                    return Err(ApiError::bad(
                                        format!("message content of type {k:?} is not supported (text only)"),
                                        Some("messages"),
                                    ))
                                }
                            }
                        }
                        s
                    }
                };
                Ok(ChatMessage {
                    role: m.role.clone(),
                    content,
                })
            })
            .collect()
    }
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(stop: Option<StopReason>) -> &'static str {
    match stop {
        Some(StopReason::MaxTokens) | Some(StopReason::ContextFull) => "length",
        Some(StopReason::Eos) | None => "stop",
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Completion,
    Chat,
}

/// A whole (non-streamed) response.
pub fn full_response(
    kind: Kind,
    id: &str,
    model: &str,
    created: u64,
    text: &str,
    finish: &str,
    usage: Usage,
) -> Value {
    let choice = match kind {
        Kind::Completion => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        }
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish,
        }),
    };
    json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    })
}

/// One streamed chunk: a text delta (`role` on a chat stream's first chunk), a finish reason, or
/// (with no choice) the usage chunk of `stream_options.include_usage`.
pub fn chunk(
    kind: Kind,
    id: &str,
    model: &str,
    created: u64,
    delta: Option<(&str, bool)>,
    finish: Option<&str>,
    usage: Option<Usage>,
) -> Value {
    let choices = match (delta, finish, usage) {
        (None, None, Some(_)) => json!([]),
        _ => {
            let text = delta.map_or("", |(t, _)| t);
            match kind {
                Kind::Completion => {
                    json!([{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}])
                }
                Kind::Chat => {
                    let d = match delta {
                        Some((t, true)) => json!({"role": "assistant", "content": t}),
                        Some((t, false)) => json!({"content": t}),
                        None => json!({}),
                    };
                    json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}])
                }
            }
        }
    };
    let mut v = json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": choices,
    });
    if let (Some(u), Some(o)) = (usage, v.as_object_mut()) {
        o.insert("usage".into(), json!(u));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_with_the_field_named() {
        let c = |body: &str| {
            parse::<CompletionRequest>(body.as_bytes()).and_then(|r| r.common.limits())
        };
        for (body, param) in [
            (r#"{"prompt":"a","temperature":3}"#, "temperature"),
            (r#"{"prompt":"a","top_p":0}"#, "top_p"),
            (r#"{"prompt":"a","max_tokens":0}"#, "max_tokens"),
            (r#"{"prompt":"a","n":2}"#, "n"),
            (r#"{"prompt":"a","top_k":-3}"#, "top_k"),
            (r#"{"prompt":"a","min_p":1.5}"#, "min_p"),
            (
                r#"{"prompt":"a","repetition_penalty":0}"#,
                "repetition_penalty",
            ),
            (r#"{"prompt":"a","stop":["1","2","3","4","5"]}"#, "stop"),
            (r#"{"prompt":"a","logprobs":2}"#, "logprobs"),
        ] {
            let e = c(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, Some(param), "{body}");
        }
        assert!(parse::<CompletionRequest>(b"{\"prompt\":")
            .unwrap_err()
            .message
            .contains("not valid JSON"));
        assert!(parse::<CompletionRequest>(br#"{"prompt":5}"#).is_err());
        let l =
            c(r#"{"prompt":"a","max_tokens":7,"temperature":0,"top_k":-1,"stop":"x","seed":3}"#)
                .unwrap();
        assert_eq!(
            (l.max_tokens, l.top_k, l.seed, l.stops.len()),
            (Some(7), None, 3, 1)
        );
    }

    #[test]
    fn chunks_have_the_openai_shape() {
        let c = chunk(Kind::Chat, "id", "m", 1, Some(("hi", true)), None, None);
        assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(c["object"], "chat.completion.chunk");
        let u = chunk(
            Kind::Completion,
            "id",
            "m",
            1,
            None,
            None,
            Some(Usage::new(2, 3)),
        );
        assert_eq!(u["choices"].as_array().map(Vec::len), Some(0));
        assert_eq!(u["usage"]["total_tokens"], 5);
        let e = ApiError::bad("x", Some("n")).body();
        assert_eq!(e["error"]["param"], "n");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
}
