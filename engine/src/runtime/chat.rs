//! Chat templates: a model's Jinja `chat_template` rendered the way Hugging Face transformers'
//! `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders it.
//!
//! The template comes from the model folder: `chat_template.jinja` when present (it wins, as in
//! transformers), else `tokenizer_config.json`'s `chat_template` (a string, or a list of
//! `{name, template}` of which the one named "default" is used). `bos_token` / `eos_token` come
//! from `tokenizer_config.json` (a string or an `{"content": ...}` object).
//!
//! The environment mirrors transformers' `_compile_jinja_template`: `trim_blocks` and
//! `lstrip_blocks` on, trailing newline of the source dropped, `{% break %}` / `{% continue %}`,
//! globals `raise_exception(msg)` (an error carrying `msg`) and `strftime_now(fmt)`, a `tojson`
//! filter that is Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//! sort_keys=False)`, Python string / dict / list methods (`.strip()`, `.split()`,
//! `.startswith()`, `.items()`, `.get()` ... through minijinja-contrib's pycompat), and the
//! variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools = none`,
//! `documents = none` plus any extra variables the caller passes (`enable_thinking`, `tools` ...).
//! `{% generation %}` blocks (transformers' assistant-mask markers) render their body.
//!
//! **BOS**: the rendered text already contains the BOS token wherever the template writes it
//! (`{{ bos_token }}`), so callers must tokenize it WITHOUT adding special tokens again — this is
//! what transformers' `apply_chat_template(tokenize=True)` does (`add_special_tokens=False`).
//!
//! Known differences from Python Jinja2 (none of them reached by the golden tests):
//! - `strftime_now` formats the current time in UTC (transformers uses the local time), and
//!   supports the common C `strftime` directives (see [`strftime`]).
//! - Output of `{{ x }}` follows Python's `str()` for none / booleans / numbers / lists / dicts
//!   (`None`, `True`, `1.0`, `['a', 1]`), but `x|string` and `~` use minijinja's spelling
//!   (`none`, `true`, `["a", 1]`).
//! - Objects the caller passes as extra variables (e.g. `tools`) reach the template through
//!   `serde_json::Value`, whose maps are sorted by key: `tools|tojson` lists keys in sorted order
//!   where Python keeps the caller's insertion order.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat turn, as the OpenAI / transformers message dicts: `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The name the template is registered under inside its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Prefix of the detail of errors raised by the template's own `raise_exception(msg)`, so they
/// can be told apart from engine errors (undefined values, bad operands) when reported.
const RAISED: &str = "\u{0}raise_exception\u{0}";

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Where the template came from (a file, or `chat_template` for a string), for messages.
    origin: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` with the given special tokens. A syntax error is an [`Error::Config`]
    /// naming the line and minijinja's message.
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        Self::compile(source, PathBuf::from(TEMPLATE_NAME), bos_token, eos_token)
    }

    /// The model folder's chat template: `chat_template.jinja` if present (it wins), else the
    /// `chat_template` of `tokenizer_config.json`; `Ok(None)` when the folder has neither.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let jinja_path = dir.join("chat_template.jinja");
        let config = read_optional(&config_path)?;
        let jinja = read_optional(&jinja_path)?;
        let config = match config {
            Some(text) => Some(serde_json::from_str::<serde_json::Value>(&text).map_err(
                |source| Error::Json {
                    path: config_path.clone(),
                    source,
                },
            )?),
            None => None,
        };
        let origin = if jinja.is_some() {
            jinja_path
        } else {
            config_path
        };
        Self::from_parts(config.as_ref(), jinja, origin)
    }

    /// As [`ChatTemplate::from_dir`], from the text of a `tokenizer_config.json` and the text of
    /// a `chat_template.jinja` beside it, if any.
    pub fn from_tokenizer_config_str(
        json: &str,
        jinja_file: Option<String>,
    ) -> Result<Option<Self>> {
        let origin = PathBuf::from("tokenizer_config.json");
        let config: serde_json::Value =
            serde_json::from_str(json).map_err(|source| Error::Json {
                path: origin.clone(),
                source,
            })?;
        let origin = if jinja_file.is_some() {
            PathBuf::from("chat_template.jinja")
        } else {
            origin
        };
        Self::from_parts(Some(&config), jinja_file, origin)
    }

    fn from_parts(
        config: Option<&serde_json::Value>,
        jinja_file: Option<String>,
        origin: PathBuf,
    ) -> Result<Option<Self>> {
        let special = |key: &str| -> Result<Option<String>> {
            match config.and_then(|c| c.get(key)) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(Error::config(
                        &origin,
                        format!("{key} is an object without a string \"content\""),
                    )),
                },
                Some(other) => Err(Error::config(
                    &origin,
                    format!("{key} must be a string or an object with \"content\", found {other}"),
                )),
            }
        };
        let bos = special("bos_token")?;
        let eos = special("eos_token")?;
        let source = match jinja_file {
            Some(s) => Some(s),
            None => match config.and_then(|c| c.get("chat_template")) {
                None | Some(serde_json::Value::Null) => None,
                Some(value) => Some(pick_template(value, &origin)?),
            },
        };
        match source {
            Some(source) => Ok(Some(Self::compile(source, origin, bos, eos)?)),
            None => Ok(None),
        }
    }

    fn compile(
        source: String,
        origin: PathBuf,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_debug(false);
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| Error::config(&origin, format!("chat template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            out.write_str(&py_str(value))
                .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
        });
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: &str| strftime(format, now_unix()));
        let compiled = strip_generation_tags(&source).into_owned();
        env.add_template_owned(TEMPLATE_NAME, compiled)
            .map_err(|e| {
                Error::config(&origin, format!("invalid chat template: {}", describe(&e)))
            })?;
        Ok(ChatTemplate {
            env,
            source,
            origin,
            bos_token,
            eos_token,
        })
    }

    /// Makes `strftime_now` report this instant (seconds since the Unix epoch, UTC) instead of
    /// the current time: for reproducible prompts and golden tests (gpt-oss writes the date).
    pub fn with_fixed_time(mut self, unix_seconds: i64) -> Self {
        self.env.add_function("strftime_now", move |format: &str| {
            strftime(format, unix_seconds)
        });
        self
    }

    /// The template text as loaded.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders the conversation. With `add_generation_prompt` the text ends with the header that
    /// opens the assistant's reply. The result already holds BOS where the template writes it:
    /// tokenize it without adding special tokens.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`ChatTemplate::render`] with extra template variables, as transformers' `**kwargs` to
    /// `apply_chat_template`: e.g. `enable_thinking` (Qwen3), `reasoning_effort` (gpt-oss),
    /// `tools` (a list of JSON tool schemas). They may override `bos_token` / `eos_token` /
    /// `tools` / `documents`, not `messages` or `add_generation_prompt`.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        vars: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::Input(
                "cannot apply a chat template to an empty conversation: give at least one message"
                    .into(),
            ));
        }
        let mut ctx: Vec<(String, Value)> = Vec::with_capacity(vars.len() + 6);
        if let Some(bos) = &self.bos_token {
            ctx.push(("bos_token".into(), Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            ctx.push(("eos_token".into(), Value::from(eos.as_str())));
        }
        ctx.push(("tools".into(), Value::from(())));
        ctx.push(("documents".into(), Value::from(())));
        for (key, value) in vars {
            if key == "messages" || key == "add_generation_prompt" {
                return Err(Error::Input(format!(
                    "chat template variable {key:?} is set by the render call itself"
                )));
            }
            ctx.retain(|(k, _)| k != key);
            ctx.push((key.clone(), Value::from(Serde(value))));
        }
        ctx.push(("messages".into(), Value::from(Serde(messages))));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx = Value::from_pairs(ctx);
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Input(format!("{}: {}", self.origin.display(), describe(&e))))?;
        template.render(ctx).map_err(|e| {
            Error::Input(format!(
                "chat template {}: {}",
                self.origin.display(),
                describe(&e)
            ))
        })
    }
}

/// The text of `path`, or `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// `chat_template` of tokenizer_config.json: a string, or a list of `{name, template}` of which
/// transformers uses the one named "default" (when no tools are passed).
fn pick_template(value: &serde_json::Value, origin: &Path) -> Result<String> {
    match value {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(list) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(t.to_string()),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => {
                        return Err(Error::config(
                            origin,
                            "chat_template list entries must be {\"name\": ..., \"template\": ...} strings",
                        ))
                    }
                }
            }
            Err(Error::config(
                origin,
                format!(
                    "chat_template has {} named templates ({}) and none named \"default\"",
                    names.len(),
                    names.join(", ")
                ),
            ))
        }
        other => Err(Error::config(
            origin,
            format!("chat_template must be a string or a list of named templates, found {other}"),
        )),
    }
}

/// One line for a minijinja error: the template's own `raise_exception` message verbatim, else
/// the kind, the detail and the template line.
fn describe(e: &minijinja::Error) -> String {
    if let Some(msg) = e.detail().and_then(|d| d.strip_prefix(RAISED)) {
        return format!("the template raised an exception: {msg}");
    }
    let mut s = e.kind().to_string();
    if let Some(detail) = e.detail() {
        let _ = write!(s, ": {detail}");
    }
    if let Some(line) = e.line() {
        let _ = write!(s, " (template line {line})");
    }
    s
}

/// `raise_exception(msg)`: transformers raises `jinja2.exceptions.TemplateError(msg)`.
fn raise_exception(msg: Value) -> std::result::Result<Value, minijinja::Error> {
    let text = match msg.as_str() {
        Some(s) => s.to_string(),
        None => py_str(&msg),
    };
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{text}"),
    ))
}

/// Replaces transformers' `{% generation %}` / `{% endgeneration %}` tags (which mark assistant
/// tokens for training masks) by `{% if true %}` / `{% endif %}` with the same whitespace
/// control, so their body renders as Jinja2 renders it.
fn strip_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        out.push_str(before);
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return Cow::Owned(out);
        };
        let (whole, after) = tag.split_at(end + 2);
        let inner = whole.get(2..whole.len() - 2).unwrap_or("");
        let (open, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (inner.get(..1).unwrap_or(""), b),
            None => ("", inner),
        };
        let (body, close) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, body.get(body.len() - 1..).unwrap_or("")),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => {
                let _ = write!(out, "{{%{open} if true {close}%}}");
            }
            "endgeneration" => {
                let _ = write!(out, "{{%{open} endif {close}%}}");
            }
            _ => out.push_str(whole),
        }
        rest = after;
    }
    out.push_str(rest);
    Cow::Owned(out)
}

// ---------------------------------------------------------------------------------------------
// Python's str() / repr() / json.dumps() of template values.

/// Python's `str(x)`: what `{{ x }}` prints in Jinja2.
fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        _ => py_repr(v),
    }
}

/// Python's `repr(x)` for the value kinds templates see.
fn py_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if v.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number => py_number(v),
        ValueKind::String => py_str_repr(v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = match v.try_iter() {
                Ok(it) => it.map(|x| py_repr(&x)).collect(),
                Err(_) => return v.to_string(),
            };
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let Ok(keys) = v.try_iter() else {
                return v.to_string();
            };
            let items: Vec<String> = keys
                .map(|k| {
                    let val = v.get_item(&k).unwrap_or(Value::UNDEFINED);
                    format!("{}: {}", py_repr(&k), py_repr(&val))
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        _ => v.to_string(),
    }
}

/// An int as Python prints it, a float as Python's `repr(float)`.
fn py_number(v: &Value) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    match f64::try_from(v.clone()) {
        Ok(f) => py_float(f, "nan", "inf"),
        Err(_) => v.to_string(),
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, positional for exponents -4..16,
/// scientific (`1e+16`, `1.5e-05`) otherwise, always with a `.0` or an exponent.
fn py_float(f: f64, nan: &str, inf: &str) -> String {
    if f.is_nan() {
        return nan.into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            inf.into()
        } else {
            format!("-{inf}")
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "1e16".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let n = digits.len() as i32;
        let text = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point >= n {
            format!("{}{}.0", digits, "0".repeat((point - n) as usize))
        } else {
            let (a, b) = digits.split_at(point as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{text}")
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        let mant = if rest.is_empty() {
            first.to_string()
        } else {
            format!("{first}.{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.unsigned_abs())
    }
}

/// Python's `repr(str)`: single quotes unless the text has a `'` and no `"`.
fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`; `ensure_ascii` and `indent` may also come positionally.
fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let pick =
        |positional: Option<Value>, name: &str| -> std::result::Result<Value, minijinja::Error> {
            let by_name: Option<Value> = kwargs.get(name)?;
            Ok(by_name.or(positional).unwrap_or(Value::from(())))
        };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_true();
    let indent = pick(indent, "indent")?;
    let separators = pick(None, "separators")?;
    let sort_keys = pick(None, "sort_keys")?.is_true();
    kwargs.assert_all_used()?;

    let indent: Option<String> = match indent.kind() {
        ValueKind::None | ValueKind::Undefined => None,
        ValueKind::String => Some(indent.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => {
            let n = i64::try_from(indent.clone())?;
            Some(" ".repeat(n.max(0) as usize))
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be an integer, a string or none",
            ))
        }
    };
    let (item_sep, key_sep) = match separators.kind() {
        ValueKind::None | ValueKind::Undefined => {
            if indent.is_some() {
                (",".to_string(), ": ".to_string())
            } else {
                (", ".to_string(), ": ".to_string())
            }
        }
        _ => {
            let parts: Vec<String> = separators
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .unwrap_or_default();
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
    };
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Python's `json.JSONEncoder` layout: `[`, items joined by `item_sep` (plus newline and indent
/// when indenting), `]`; empty containers as `[]` / `{}`.
fn write_json(
    out: &mut String,
    v: &Value,
    o: &JsonOpts,
    level: usize,
) -> std::result::Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&py_float(f, "NaN", "Infinity"));
            }
        }
        ValueKind::String => json_string(out, v.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort_by_key(json_key);
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline_indent(out, o, level + 1);
                json_string(out, &json_key(key), o.ensure_ascii);
                out.push_str(&o.key_sep);
                write_json(out, &v.get_item(key)?, o, level + 1)?;
            }
            newline_indent(out, o, level);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline_indent(out, o, level + 1);
                write_json(out, item, o, level + 1)?;
            }
            newline_indent(out, o, level);
            out.push(']');
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {} is not JSON serializable", v.kind()),
            ))
        }
    }
    Ok(())
}

/// A JSON object key as Python writes it: strings as-is, `True` as "true", numbers as text.
fn json_key(k: &Value) -> String {
    match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.into(),
        ValueKind::None => "null".into(),
        _ => k.to_string(),
    }
}

fn newline_indent(out: &mut String, o: &JsonOpts, level: usize) {
    if let Some(unit) = &o.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(unit);
        }
    }
}

/// A JSON string as Python's `json.dumps` escapes it.
fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime_now

fn now_unix() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Days since 1970-01-01 -> (year, month 1..=12, day 1..=31), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// C `strftime` (the "C" locale, as Python's `datetime.strftime`) of the UTC time `unix`
/// seconds after the epoch. Supported: `%a %A %b %B %c %d %D %e %F %H %I %j %m %M %p %R %S %T
/// %u %w %x %X %y %Y %z %Z %%`, with glibc's `-` flag (`%-d`: no padding); `%z` and `%Z` are
/// empty, as for Python's naive `datetime.now()`. Other directives are copied unchanged.
pub fn strftime(format: &str, unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, (secs / 60) % 60, secs % 60);
    // 1970-01-01 was a Thursday.
    let weekday = (days + 4).rem_euclid(7) as usize;
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS
        .get((month as usize).saturating_sub(1))
        .copied()
        .unwrap_or("");
    let day_name = WEEKDAYS.get(weekday).copied().unwrap_or("");
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, v: i64, width: usize| {
            if no_pad {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match d {
            'Y' => {
                let _ = write!(out, "{year}");
            }
            'y' => num(&mut out, year.rem_euclid(100), 2),
            'm' => num(&mut out, month as i64, 2),
            'd' => num(&mut out, day as i64, 2),
            'e' => {
                let _ = write!(out, "{day:>2}");
            }
            'H' => num(&mut out, hour, 2),
            'I' => num(&mut out, hour12, 2),
            'M' => num(&mut out, minute, 2),
            'S' => num(&mut out, second, 2),
            'j' => num(&mut out, yday, 3),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'b' | 'h' => out.push_str(month_name.get(..3).unwrap_or("")),
            'B' => out.push_str(month_name),
            'a' => out.push_str(day_name.get(..3).unwrap_or("")),
            'A' => out.push_str(day_name),
            'u' => {
                let _ = write!(out, "{}", if weekday == 0 { 7 } else { weekday });
            }
            'w' => {
                let _ = write!(out, "{weekday}");
            }
            'F' => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            'D' | 'x' => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            'T' | 'X' => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            'R' => {
                let _ = write!(out, "{hour:02}:{minute:02}");
            }
            'c' => {
                let _ = write!(
                    out,
                    "{} {} {day:>2} {hour:02}:{minute:02}:{second:02} {year}",
                    day_name.get(..3).unwrap_or(""),
                    month_name.get(..3).unwrap_or("")
                );
            }
            'z' | 'Z' => {}
            '%' => out.push('%'),
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIMPLE: &str = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", text)]
    }

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new(source.into(), Some("<s>".into()), Some("</s>".into()))?
            .render(messages, true)
    }

    #[test]
    fn string_template_with_object_bos() {
        let json = serde_json::json!({
            "chat_template": SIMPLE,
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
        });
        let t = ChatTemplate::from_tokenizer_config_str(&json.to_string(), None)
            .unwrap()
            .unwrap();
        assert_eq!(t.bos_token(), Some("<s>"));
        assert_eq!(t.eos_token(), Some("</s>"));
        assert_eq!(
            t.render(&user("hi"), true).unwrap(),
            "<s><user>hi<assistant>"
        );
        assert_eq!(t.render(&user("hi"), false).unwrap(), "<s><user>hi");
    }

    #[test]
    fn list_of_named_templates_uses_default() {
        let json = serde_json::json!({
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "DEFAULT {{ messages|length }}"},
                {"name": "rag", "template": "RAG"},
            ],
        });
        let t = ChatTemplate::from_tokenizer_config_str(&json.to_string(), None)
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&user("x"), false).unwrap(), "DEFAULT 1");

        let json = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}],
        });
        let err = ChatTemplate::from_tokenizer_config_str(&json.to_string(), None).unwrap_err();
        assert!(err.to_string().contains("none named \"default\""), "{err}");
    }

    #[test]
    fn missing_template_is_none() {
        let json = r#"{"bos_token": "<s>", "eos_token": "</s>"}"#;
        assert!(ChatTemplate::from_tokenizer_config_str(json, None)
            .unwrap()
            .is_none());
        let json = r#"{"chat_template": null}"#;
        assert!(ChatTemplate::from_tokenizer_config_str(json, None)
            .unwrap()
            .is_none());

        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_dir(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join("tokenizer_config.json"), json).unwrap();
        assert!(ChatTemplate::from_dir(dir.path()).unwrap().is_none());
    }

    #[test]
    fn chat_template_jinja_wins_over_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"chat_template": "FROM CONFIG", "bos_token": "<s>"});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&user("x"), false).unwrap(), "FROM CONFIG");

        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ bos_token }}FROM FILE\n",
        )
        .unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        // The file's trailing newline is dropped, as Jinja2's keep_trailing_newline=False does.
        assert_eq!(t.render(&user("x"), false).unwrap(), "<s>FROM FILE");

        // The jinja file alone (no tokenizer_config.json) is enough.
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&user("x"), false).unwrap(), "FROM FILE");

        let t = ChatTemplate::from_tokenizer_config_str(&config.to_string(), Some("JINJA".into()))
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&user("x"), false).unwrap(), "JINJA");
    }

    #[test]
    fn bad_config_is_an_error_not_a_panic() {
        let err = ChatTemplate::from_tokenizer_config_str("{not json", None).unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err}");
        let err =
            ChatTemplate::from_tokenizer_config_str(r#"{"chat_template": 3}"#, None).unwrap_err();
        assert!(err.to_string().contains("chat_template must be"), "{err}");
        let err = ChatTemplate::from_tokenizer_config_str(
            r#"{"chat_template": "x", "bos_token": {"lstrip": true}}"#,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bos_token"), "{err}");
    }

    #[test]
    fn raise_exception_carries_the_templates_message() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user turn!') }}{% endif %}ok";
        let err = render(src, &[ChatMessage::new("assistant", "hi")]).unwrap_err();
        assert!(matches!(err, Error::Input(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(
                "the template raised an exception: Conversation must start with a user turn!"
            ),
            "{msg}"
        );
        assert_eq!(render(src, &user("hi")).unwrap(), "ok");
    }

    #[test]
    fn syntax_error_is_a_config_error() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }".into(), None, None)
            .unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(err.to_string().contains("invalid chat template"), "{err}");
        let err = ChatTemplate::new("{% if x %}unclosed".into(), None, None).unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn empty_conversation_and_reserved_vars_are_input_errors() {
        let t = ChatTemplate::new(SIMPLE.into(), None, None).unwrap();
        assert!(matches!(t.render(&[], true), Err(Error::Input(_))));
        let mut vars = serde_json::Map::new();
        vars.insert("messages".into(), serde_json::json!([]));
        assert!(matches!(
            t.render_with(&user("x"), true, &vars),
            Err(Error::Input(_))
        ));
    }

    #[test]
    fn environment_matches_transformers() {
        // trim_blocks + lstrip_blocks: block lines leave no whitespace behind.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(render(src, &user("a")).unwrap(), "[a]\n");
        // tools and documents are defined and none; extra variables reach the template.
        let t = ChatTemplate::new(
            "{{ tools is defined }} {{ tools is none }} {{ documents }} {{ enable_thinking }} {{ 1.5 }} {{ [1, 'a', none] }}".into(),
            None,
            None,
        )
        .unwrap();
        let mut vars = serde_json::Map::new();
        vars.insert("enable_thinking".into(), serde_json::json!(false));
        assert_eq!(
            t.render_with(&user("x"), false, &vars).unwrap(),
            "True True None False 1.5 [1, 'a', None]"
        );
        // Python string and dict methods, slicing, loop controls, namespace.
        let src = "{{ '  x  '.strip() }}|{{ 'a,b'.split(',')|join('+') }}|{{ 'abc'.startswith('ab') }}|{% for k, v in {'k': 1}.items() %}{{ k }}={{ v }}{% endfor %}|{{ {'a': 2}.get('a') }}|{% for m in messages[::-1] %}{{ m.content }}{% endfor %}|{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}|{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}";
        let msgs = [ChatMessage::new("user", "1"), ChatMessage::new("user", "2")];
        assert_eq!(render(src, &msgs).unwrap(), "x|a+b|True|k=1|2|21|01|1");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let t = ChatTemplate::new(
            "{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(separators=(',', ':')) }}|{{ x|tojson(sort_keys=true, ensure_ascii=true) }}|{{ []|tojson(indent=2) }}".into(),
            None,
            None,
        )
        .unwrap();
        let mut vars = serde_json::Map::new();
        vars.insert(
            "x".into(),
            serde_json::json!({"b": [1, 2.5, "é<&>\"\n"], "a": null, "c": true}),
        );
        // serde_json's map (no preserve_order) hands the keys over sorted: a, b, c.
        assert_eq!(
            t.render_with(&user("x"), false, &vars).unwrap(),
            concat!(
                r#"{"a": null, "b": [1, 2.5, "é<&>\"\n"], "c": true}|"#,
                "{\n  \"a\": null,\n  \"b\": [\n    1,\n    2.5,\n    \"é<&>\\\"\\n\"\n  ],\n  \"c\": true\n}|",
                r#"{"a":null,"b":[1,2.5,"é<&>\"\n"],"c":true}|"#,
                r#"{"a": null, "b": [1, 2.5, "\u00e9<&>\"\n"], "c": true}|"#,
                "[]"
            )
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}\n{%- generation -%} ! {%- endgeneration %}{% endfor %}";
        assert_eq!(render(src, &user("a")).unwrap(), "a!");
    }

    #[test]
    fn strftime_now_and_fixed_time() {
        // 2025-06-15 12:34:56 UTC, a Sunday, day 166.
        let t = 1_749_990_896;
        assert_eq!(
            strftime(
                "%Y-%m-%d %H:%M:%S|%d %b %Y|%-d %B|%a %A %j %p %I|%y %e %%|%Q",
                t
            ),
            "2025-06-15 12:34:56|15 Jun 2025|15 June|Sun Sunday 166 PM 12|25 15 %|%Q"
        );
        assert_eq!(strftime("%F %T", 0), "1970-01-01 00:00:00");
        assert_eq!(strftime("%F %a", 951_782_400), "2000-02-29 Tue");
        let tpl = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}".into(), None, None)
            .unwrap()
            .with_fixed_time(t);
        assert_eq!(tpl.render(&user("x"), false).unwrap(), "15 Jun 2025");
    }

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (2.5, "2.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789.0, "123456789.0"),
            (-0.5, "-0.5"),
            (1e300, "1e+300"),
        ] {
            assert_eq!(py_float(f, "nan", "inf"), s);
        }
    }
}
