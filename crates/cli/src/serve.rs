//! `hybrid serve`: an OpenAI-compatible HTTP server on the customer's machine, so that the
//! applications that already talk to a local LLM (llama.cpp's server, Ollama, vLLM, the `openai`
//! Python package) talk to a hybrid model unchanged.
//!
//! Routes: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`, each
//! streamed as server-sent events (`"stream": true`, ending with `data: [DONE]`) or answered
//! whole. Chat messages are rendered with the model's own chat template. Every answer carries a
//! `usage` object: prompt and completion tokens, and in remote mode the protected tokens the
//! gateway billed (`protected_tokens_billed`). Errors have OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! One model instance generates for one request at a time (its KV cache is the request's):
//! requests wait in a queue of `--max-queue`; past that they get 429 `queue_full` at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use hybrid_model::chat::{ChatTemplate, Message};
use hybrid_model::remote::RemoteStats;
use hybrid_model::{generate_while, GenerateOptions, Model, ModelError};
use serde::Deserialize;
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::model_cmd::{load_model, Loaded, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to serve on (loopback by default: the server speaks for the customer's license).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// The model id clients name and `/v1/models` lists [default: the model's own name].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests that may wait for the model while it generates for another; more get 429.
    #[arg(long, default_value_t = 8)]
    max_queue: usize,
    /// `max_tokens` of a request that gives none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Require `Authorization: Bearer KEY` of clients [default: no key].
    #[arg(long, env = "HYBRID_SERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

/// An error answer in OpenAI's shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: String,
    message: String,
}

impl ApiError {
    fn invalid(code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: code.into(),
            message: message.into(),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
    }

    /// What a generation error tells the client: its own mistakes as 400, the gateway's
    /// refusals and overloads with the gateway's status and code, the rest as 500.
    fn from_model(e: &ModelError) -> Self {
        match e {
            ModelError::ContextTooLong { .. } => {
                ApiError::invalid("context_length_exceeded", e.to_string())
            }
            ModelError::EmptyPrompt | ModelError::Tokenizer(_) => {
                ApiError::invalid("invalid_prompt", e.to_string())
            }
            ModelError::Remote { status, code, .. } => ApiError {
                status: StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
                kind: if *status == 429 {
                    "rate_limit_error"
                } else if *status >= 500 {
                    "server_error"
                } else {
                    "invalid_request_error"
                },
                code: code.clone(),
                message: e.to_string(),
            },
            ModelError::Transport(_) => ApiError {
                status: StatusCode::BAD_GATEWAY,
                kind: "server_error",
                code: "gateway_unreachable".into(),
                message: e.to_string(),
            },
            _ => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "server_error",
                code: "generation_failed".into(),
                message: e.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A request for the model thread.
struct Job {
    prompt: Vec<u32>,
    options: GenerateOptions,
    stop: Vec<String>,
    events: mpsc::UnboundedSender<Step>,
}

/// What the model thread reports of a job.
enum Step {
    /// New text (never part of a stop sequence).
    Text(String),
    Done(Finish),
    Failed(ApiError),
}

struct Finish {
    reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Remote mode: tokens the gateway billed for this request (the largest count over the
    /// protected layers).
    billed: Option<u64>,
}

impl Finish {
    fn usage(&self) -> Value {
        let mut usage = json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        });
        if let Some(billed) = self.billed {
            usage["protected_tokens_billed"] = json!(billed);
        }
        usage
    }
}

/// Shared state of the handlers.
struct Server {
    name: String,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    jobs: mpsc::Sender<Job>,
    default_max_tokens: usize,
    api_key: Option<String>,
    created: u64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn run(args: ServeArgs) -> Result<()> {
    let loaded = load_model(&args.model)?;
    let tokenizer = loaded
        .tokenizer
        .clone()
        .context("the model has no tokenizer.json")?;
    let template = match &loaded.chat_template {
        Some(source) => {
            let eos = loaded
                .eos_token
                .and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default();
            Some(ChatTemplate::new(source, "", &eos)?)
        }
        None => None,
    };
    let name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| loaded.name.clone());
    let (jobs, queue) = mpsc::channel(args.max_queue.max(1));
    let protected = loaded.protected.len();
    let engine_tokenizer = tokenizer.clone();
    let Loaded {
        model,
        eos_token,
        stats,
        ..
    } = loaded;
    std::thread::Builder::new()
        .name("model".into())
        .spawn(move || engine(model, engine_tokenizer, eos_token, stats, protected, queue))?;
    let server = Arc::new(Server {
        name,
        tokenizer,
        template,
        jobs,
        default_max_tokens: args.default_max_tokens,
        api_key: args.api_key.clone(),
        created: now_s(),
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(server.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "serving `{}` ({} mode) at http://{addr}/v1 (OpenAI-compatible)",
            server.name, args.model.mode
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}

/// The model thread: one job at a time, text streamed back as it is generated.
fn engine(
    mut model: Model,
    tokenizer: Tokenizer,
    eos: Option<u32>,
    stats: Option<Arc<RemoteStats>>,
    protected: usize,
    mut queue: mpsc::Receiver<Job>,
) {
    while let Some(job) = queue.blocking_recv() {
        if job.events.is_closed() {
            continue; // The client left while waiting.
        }
        let before = stats.as_ref().map(|s| s.snapshot());
        let mut options = job.options.clone();
        options.eos_token = eos;
        let mut text = TextSplitter::new(&tokenizer, job.stop.clone());
        let mut stopped = false;
        let result = generate_while(model.as_mut(), &job.prompt, &options, |token| {
            let (delta, hit) = text.push(token);
            if !delta.is_empty() && job.events.send(Step::Text(delta)).is_err() {
                return false; // Gone: stop generating for nobody.
            }
            stopped = hit;
            !hit
        });
        let billed = match (&stats, before) {
            (Some(s), Some(before)) if protected > 0 => {
                Some((s.snapshot() - before).rows / protected as u64)
            }
            _ => None,
        };
        let step = match result {
            Ok(tokens) => {
                let rest = text.finish();
                if !rest.is_empty() {
                    let _ = job.events.send(Step::Text(rest));
                }
                let ended = stopped || tokens.last().is_some_and(|t| Some(*t) == eos);
                Step::Done(Finish {
                    reason: if ended || tokens.len() < options.max_tokens {
                        "stop"
                    } else {
                        "length"
                    },
                    prompt_tokens: job.prompt.len(),
                    completion_tokens: tokens.len(),
                    billed,
                })
            }
            Err(e) => Step::Failed(ApiError::from_model(&e)),
        };
        let _ = job.events.send(step);
    }
}

/// Decoded text of generated tokens, handed out as it grows, held back while it may be the
/// start of a stop sequence and cut where one appears.
struct TextSplitter<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    stop: Vec<String>,
    /// Bytes of the decoded text handed out.
    sent: usize,
    text: String,
    done: bool,
}

impl<'a> TextSplitter<'a> {
    fn new(tokenizer: &'a Tokenizer, stop: Vec<String>) -> Self {
        TextSplitter {
            tokenizer,
            ids: Vec::new(),
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            sent: 0,
            text: String::new(),
            done: false,
        }
    }

    /// Adds a token; returns the text that may be handed out now, and whether a stop sequence
    /// was produced (the text then ends before it).
    fn push(&mut self, token: u32) -> (String, bool) {
        if self.done {
            return (String::new(), true);
        }
        self.ids.push(token);
        if let Ok(text) = self.tokenizer.decode(&self.ids, true) {
            self.text = text;
        }
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.done = true;
            self.text.truncate(at);
            return (self.take(self.text.len()), true);
        }
        // Hold back a tail that could begin a stop sequence, and a split character.
        let mut upto = self.text.len();
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    upto = upto.min(self.text.len() - k);
                    break;
                }
            }
        }
        if self.text.ends_with('\u{FFFD}') {
            upto = upto.min(self.text.len() - '\u{FFFD}'.len_utf8());
        }
        (self.take(upto), false)
    }

    fn take(&mut self, upto: usize) -> String {
        if upto <= self.sent || !self.text.is_char_boundary(upto) {
            return String::new();
        }
        let out = self.text[self.sent..upto].to_string();
        self.sent = upto;
        out
    }

    /// What was held back, at the end of generation.
    fn finish(&mut self) -> String {
        self.take(self.text.len())
    }
}

/// `stop`: a string or a list of up to 4.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn list(self) -> Result<Vec<String>, ApiError> {
        let list = match self {
            Stop::None => vec![],
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        if list.len() > 4 {
            return Err(ApiError::invalid(
                "invalid_stop",
                "at most 4 stop sequences",
            ));
        }
        Ok(list)
    }
}

/// The sampling fields both kinds of request share.
#[derive(Deserialize)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<usize>,
    /// OpenAI's newer name for `max_tokens` in chat requests.
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Stop,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<usize>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Content,
}

/// A message's content: text, or a list of parts of which the text ones are read.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Content {
    #[default]
    None,
    Text(String),
    Parts(Vec<Value>),
}

impl Content {
    fn text(self) -> Result<String, ApiError> {
        match self {
            Content::None => Ok(String::new()),
            Content::Text(t) => Ok(t),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => Ok(t.to_string()),
                    _ => Err(ApiError::invalid(
                        "unsupported_content",
                        "only text content parts are supported",
                    )),
                })
                .collect(),
        }
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: PromptText,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptText {
    One(String),
    Many(Vec<String>),
}

impl Server {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            return Ok(());
        }
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: "invalid_api_key".into(),
            message: "a valid API key is required (Authorization: Bearer KEY)".into(),
        })
    }

    /// The generation options of a request, checked.
    fn options(&self, s: &Sampling) -> Result<GenerateOptions, ApiError> {
        if let Some(model) = &s.model {
            if model != &self.name {
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    kind: "invalid_request_error",
                    code: "model_not_found".into(),
                    message: format!("model `{model}` is not served here; `{}` is", self.name),
                });
            }
        }
        if s.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "unsupported_n",
                "only n = 1 is supported",
            ));
        }
        let temperature = s.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "invalid_temperature",
                "temperature is in [0, 2]",
            ));
        }
        let top_p = s.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid("invalid_top_p", "top_p is in (0, 1]"));
        }
        let max_tokens = s
            .max_completion_tokens
            .or(s.max_tokens)
            .unwrap_or(self.default_max_tokens);
        if max_tokens == 0 {
            return Err(ApiError::invalid(
                "invalid_max_tokens",
                "max_tokens is at least 1",
            ));
        }
        Ok(GenerateOptions {
            max_tokens,
            // Temperature 0 is greedy decoding, as OpenAI's API documents it.
            temperature: (temperature > 0.0).then_some(temperature),
            top_p: (temperature > 0.0 && top_p < 1.0).then_some(top_p),
            seed: s
                .seed
                .unwrap_or_else(|| uuid::Uuid::new_v4().as_u128() as u64),
            eos_token: None,
        })
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let ids = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ApiError::invalid("invalid_prompt", e.to_string()))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(ApiError::invalid("invalid_prompt", "the prompt is empty"));
        }
        Ok(ids)
    }

    /// Queues a job; its steps arrive on the returned receiver.
    fn submit(
        &self,
        prompt: Vec<u32>,
        options: GenerateOptions,
        stop: Vec<String>,
    ) -> Result<mpsc::UnboundedReceiver<Step>, ApiError> {
        let (events, steps) = mpsc::unbounded_channel();
        let job = Job {
            prompt,
            options,
            stop,
            events,
        };
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "rate_limit_error",
                code: "queue_full".into(),
                message: format!(
                    "{} requests are already waiting for the model; retry later",
                    self.jobs.max_capacity()
                ),
            },
            mpsc::error::TrySendError::Closed(_) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: "model_stopped".into(),
                message: "the model is no longer running".into(),
            },
        })?;
        Ok(steps)
    }
}

async fn models(State(server): State<Arc<Server>>, headers: HeaderMap) -> Response {
    if let Err(e) = server.authorize(&headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{"id": server.name, "object": "model", "created": server.created, "owned_by": "hybrid-fhe"}],
    }))
    .into_response()
}

/// How one kind of answer is shaped.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

/// A request's body, from a client that may send it.
fn parse<T>(
    server: &Server,
    headers: &HeaderMap,
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    server.authorize(headers)?;
    let Json(request) = body.map_err(|e| ApiError::invalid("invalid_json", e.body_text()))?;
    Ok(request)
}

async fn chat_completions(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    body: Result<Json<ChatRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let result = async {
        let request = parse(&server, &headers, body)?;
        let options = server.options(&request.sampling)?;
        let template = server.template.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "no_chat_template",
                "the model has no chat template: use /v1/completions",
            )
        })?;
        if request.messages.is_empty() {
            return Err(ApiError::invalid("invalid_messages", "messages is empty"));
        }
        let messages = request
            .messages
            .into_iter()
            .map(|m| {
                Ok(Message {
                    role: m.role,
                    content: m.content.text()?,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let text = template
            .render(&messages, true)
            .map_err(|e| ApiError::invalid("invalid_messages", e.to_string()))?;
        answer(&server, Kind::Chat, &text, options, request.sampling).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    body: Result<Json<CompletionRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let result = async {
        let request = parse(&server, &headers, body)?;
        let options = server.options(&request.sampling)?;
        let text = match request.prompt {
            PromptText::One(t) => t,
            PromptText::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptText::Many(_) => {
                return Err(ApiError::invalid(
                    "unsupported_prompt",
                    "one prompt per request",
                ))
            }
        };
        answer(&server, Kind::Text, &text, options, request.sampling).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Generates after the prompt `text` and answers, whole or streamed as `sampling` asks.
async fn answer(
    server: &Server,
    kind: Kind,
    text: &str,
    options: GenerateOptions,
    sampling: Sampling,
) -> Result<Response, ApiError> {
    let prompt = server.tokenize(text)?;
    let stop = sampling.stop.list()?;
    let include_usage = sampling.stream_options.is_some_and(|o| o.include_usage);
    let mut steps = server.submit(prompt, options, stop)?;
    let (prefix, object) = match kind {
        Kind::Chat => ("chatcmpl", "chat.completion"),
        Kind::Text => ("cmpl", "text_completion"),
    };
    let id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let created = now_s();
    let model = server.name.clone();
    if !sampling.stream {
        let mut text = String::new();
        while let Some(step) = steps.recv().await {
            match step {
                Step::Text(t) => text.push_str(&t),
                Step::Failed(e) => return Err(e),
                Step::Done(finish) => {
                    let choice = match kind {
                        Kind::Chat => {
                            json!({"index": 0, "logprobs": null, "finish_reason": finish.reason,
                            "message": {"role": "assistant", "content": text}})
                        }
                        Kind::Text => {
                            json!({"index": 0, "logprobs": null, "finish_reason": finish.reason,
                            "text": text})
                        }
                    };
                    return Ok(Json(
                        json!({"id": id, "object": object, "created": created, "model": model,
                        "choices": [choice], "usage": finish.usage()}),
                    )
                    .into_response());
                }
            }
        }
        return Err(ApiError::from_model(&ModelError::Backend(
            "the model stopped".into(),
        )));
    }
    let chunk_object = match kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    let chunk = move |delta: Value, finish: Option<&str>| -> Value {
        let choice = match kind {
            Kind::Chat => {
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                "logprobs": null, "finish_reason": finish})
            }
        };
        json!({"id": id, "object": chunk_object, "created": created, "model": model, "choices": [choice]})
    };
    let event = |v: &Value| Ok::<_, std::convert::Infallible>(Event::default().data(v.to_string()));
    // The first chunk of a chat stream names the role, as OpenAI's does.
    let first = match kind {
        Kind::Chat => vec![event(&chunk(
            json!({"role": "assistant", "content": ""}),
            None,
        ))],
        Kind::Text => vec![],
    };
    let stream = futures_util::stream::unfold(
        (steps, first, false),
        move |(mut steps, mut pending, mut ended)| {
            let chunk = chunk.clone();
            async move {
                loop {
                    if let Some(e) = pending.pop() {
                        return Some((e, (steps, pending, ended)));
                    }
                    if ended {
                        return None;
                    }
                    match steps.recv().await {
                        Some(Step::Text(t)) => {
                            pending.push(event(&chunk(json!({"content": t}), None)))
                        }
                        Some(Step::Done(finish)) => {
                            ended = true;
                            // The finishing chunk, then (when asked) one with the usage only.
                            let last = chunk(json!({}), Some(finish.reason));
                            let mut events = vec![last.clone()];
                            if include_usage {
                                let mut usage = last;
                                usage["choices"] = json!([]);
                                usage["usage"] = finish.usage();
                                events.push(usage);
                            }
                            pending.push(Ok(Event::default().data("[DONE]")));
                            for v in events.iter().rev() {
                                pending.push(event(v));
                            }
                        }
                        Some(Step::Failed(e)) => {
                            ended = true;
                            pending.push(Ok(Event::default().data("[DONE]")));
                            pending.push(event(&e.body()));
                        }
                        None => {
                            ended = true;
                        }
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
