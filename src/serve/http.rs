//! The HTTP side (axum on tokio): routes, API-key check, body limit, request → engine
//! `Request`, and the engine's events → an OpenAI JSON response or server-sent events in
//! OpenAI's chunk format ending with `data: [DONE]`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

use super::api::{self, ApiError, ChatRequest, CompletionRequest, Limits, Prompt};
use super::engine::{Event, Request, TokenLogprob};
use super::metrics::Metrics;
use crate::infer::{Message, Tokenizer};

/// Largest request body accepted (413 above).
pub const BODY_LIMIT: usize = 4 << 20;

pub struct AppState {
    pub engine: Mutex<mpsc::Sender<Request>>,
    pub tok: Arc<Tokenizer>,
    pub limits: Limits,
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError {
                status: 404,
                message: "no such route (POST /v1/completions, POST /v1/chat/completions, GET \
                          /v1/models, /health, /metrics)"
                    .into(),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
        })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Counts finished requests by route and status.
async fn count(State(st): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let resp = next.run(req).await;
    st.metrics.request(&route, resp.status().as_u16());
    resp
}

/// `Authorization: Bearer KEY` on /v1 routes when the server has `--api-key`.
async fn authorize(State(st): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError {
                status: 401,
                message: "Incorrect or missing API key (Authorization: Bearer <key>)".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    next.run(req).await
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": st.limits.served_model,
        "object": "model",
        "created": now_secs(),
        "owned_by": "moe",
        "max_model_len": st.limits.max_model_len,
    }]}))
}

/// The body as JSON of type T: 413 over the size limit, 400 with serde's message (naming the
/// missing or mistyped field) otherwise.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| ApiError {
        status: e.status().as_u16(),
        message: format!("request body: {}", e.body_text()),
        kind: "invalid_request_error",
        param: None,
        code: None,
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(None, format!("request body is not a valid request: {e}")))
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// A request ready for the engine, with what the response needs.
struct Job {
    kind: Kind,
    model: String,
    prompts: Vec<Vec<u32>>,
    /// Per prompt.
    max_tokens: Vec<usize>,
    logprobs: Option<usize>,
    v: api::Validated,
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: CompletionRequest = parse(body)?;
    if r.echo == Some(true) || r.suffix.is_some() {
        return Err(ApiError::invalid(
            Some(if r.suffix.is_some() { "suffix" } else { "echo" }),
            "echo and suffix are not supported",
        ));
    }
    let enc = |t: &str| {
        st.tok
            .encode(t, true)
            .map_err(|e| ApiError::invalid(Some("prompt"), format!("prompt: {e}")))
    };
    let prompts: Vec<Vec<u32>> = match &r.prompt {
        Prompt::Text(t) => vec![enc(t)?],
        Prompt::Texts(ts) => ts.iter().map(|t| enc(t)).collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids.clone()],
        Prompt::IdLists(l) => l.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "prompt: an empty list"));
    }
    let v = api::validate(&r.common, &st.limits, prompts.len())?;
    // OpenAI's default for completions: 16 tokens.
    let max_tokens = prompts
        .iter()
        .map(|p| api::budget("prompt", p, r.common.max_tokens, Some(16), &st.limits))
        .collect::<Result<Vec<_>, _>>()?;
    if r.logprobs.is_some_and(|k| k > api::MAX_LOGPROBS) {
        return Err(ApiError::invalid(
            Some("logprobs"),
            format!("logprobs = {:?}: at most {}", r.logprobs, api::MAX_LOGPROBS),
        ));
    }
    let job = Job {
        kind: Kind::Completion,
        model: r.common.model.clone(),
        prompts,
        max_tokens,
        logprobs: r.logprobs,
        v,
    };
    run(&st, job).await
}

async fn chat(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let r: ChatRequest = parse(body)?;
    if r.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages: an empty list",
        ));
    }
    if !st.tok.has_chat_template() {
        return Err(ApiError::invalid(
            Some("messages"),
            "the model has no chat template (tokenizer_config.json chat_template or \
             chat_template.jinja); use /v1/completions",
        ));
    }
    let msgs = r
        .messages
        .iter()
        .map(|m| {
            Ok(Message {
                role: m.role.clone(),
                content: m.text()?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let prompt = crate::infer::chat_prompt(&st.tok, None, &msgs)
        .map_err(|e| ApiError::invalid(Some("messages"), format!("{e:#}")))?;
    let v = api::validate(&r.common, &st.limits, 1)?;
    let max = r.max_completion_tokens.or(r.common.max_tokens);
    let max_tokens = vec![api::budget("messages", &prompt, max, None, &st.limits)?];
    let logprobs = match (r.logprobs.unwrap_or(false), r.top_logprobs) {
        (_, Some(k)) if k > api::MAX_LOGPROBS => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                format!("top_logprobs = {k}: at most {}", api::MAX_LOGPROBS),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                "top_logprobs needs logprobs: true",
            ))
        }
        (true, k) => Some(k.unwrap_or(0)),
        (false, None) => None,
    };
    let job = Job {
        kind: Kind::Chat,
        model: r.common.model.clone(),
        prompts: vec![prompt],
        max_tokens,
        logprobs,
        v,
    };
    run(&st, job).await
}

/// Hands the job to the engine and answers with JSON or an event stream.
async fn run(st: &Arc<AppState>, job: Job) -> Result<Response, ApiError> {
    let (tx, rx) = unbounded_channel();
    let req = Request {
        prompts: job.prompts.clone(),
        n: job.v.n,
        sampling: job.v.sampling.clone(),
        frequency_penalty: job.v.frequency_penalty,
        presence_penalty: job.v.presence_penalty,
        max_tokens: job.max_tokens.clone(),
        stop: job.v.stop.clone(),
        ignore_eos: job.v.ignore_eos,
        logprobs: job.logprobs,
        arrived: Instant::now(),
        events: tx,
    };
    let sent = st
        .engine
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(req);
    if sent.is_err() {
        return Err(ApiError {
            status: 503,
            message: "the engine has stopped".into(),
            kind: "server_error",
            param: None,
            code: None,
        });
    }
    let id = format!(
        "{}-{:016x}",
        if job.kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        rand::random::<u64>()
    );
    if job.v.stream {
        let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
        tokio::spawn(stream(job, id, rx, out_tx));
        return Ok(Sse::new(ReceiverStream::new(out_rx))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    collect(job, id, rx).await.map(|v| Json(v).into_response())
}

/// One choice's accumulated output.
#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<(TokenLogprob, usize)>,
    finish: Option<&'static str>,
}

/// Prompt tokens counted once per prompt, completion tokens per choice.
fn usage_of(job: &Job, completion: usize) -> Value {
    let prompt: usize = job.prompts.iter().map(Vec::len).sum();
    api::usage(prompt, completion)
}

fn engine_failed(msg: String) -> ApiError {
    ApiError {
        status: 500,
        message: format!("generation failed: {msg}"),
        kind: "server_error",
        param: None,
        code: None,
    }
}

async fn collect(
    job: Job,
    id: String,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Value, ApiError> {
    let total = job.prompts.len() * job.v.n;
    let mut choices: BTreeMap<usize, Choice> = (0..total).map(|i| (i, Choice::default())).collect();
    let mut done = 0;
    let mut completion = 0;
    while done < total {
        let Some(ev) = rx.recv().await else {
            return Err(engine_failed("the engine dropped the request".into()));
        };
        match ev {
            Event::Token {
                choice,
                text,
                logprob,
                ..
            } => {
                let c = choices.entry(choice).or_default();
                if let Some(lp) = logprob {
                    c.logprobs.push((lp, c.text.len()));
                }
                c.text += &text;
            }
            Event::Done {
                choice,
                finish,
                completion_tokens,
                ..
            } => {
                choices.entry(choice).or_default().finish = Some(api::finish_reason(finish));
                completion += completion_tokens;
                done += 1;
            }
            Event::Failed(msg) => return Err(engine_failed(msg)),
        }
    }
    let list: Vec<Value> = choices
        .into_iter()
        .map(|(i, c)| match job.kind {
            Kind::Completion => json!({
                "index": i,
                "text": c.text,
                "logprobs": job.logprobs.map(|_| api::completion_logprobs(&c.logprobs)),
                "finish_reason": c.finish,
            }),
            Kind::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": job.logprobs.map(|_| {
                    let l: Vec<TokenLogprob> = c.logprobs.into_iter().map(|(l, _)| l).collect();
                    api::chat_logprobs(&l)
                }),
                "finish_reason": c.finish,
            }),
        })
        .collect();
    Ok(json!({
        "id": id,
        "object": if job.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": now_secs(),
        "model": job.model,
        "choices": list,
        "usage": usage_of(&job, completion),
    }))
}

/// Engine events → SSE chunks; ends when every choice is done, the engine fails, or the client
/// goes away (its receiver dropped: the send fails, this task ends and drops `rx`, and the engine
/// frees the request's rows at its next step).
async fn stream(
    job: Job,
    id: String,
    mut rx: UnboundedReceiver<Event>,
    out: tokio::sync::mpsc::Sender<Result<SseEvent, Infallible>>,
) {
    let total = job.prompts.len() * job.v.n;
    let created = now_secs();
    let object = match job.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    };
    let chunk = |choice: Value, usage: Option<Value>| {
        let mut c = json!({
            "id": id, "object": object, "created": created, "model": job.model,
            "choices": [choice],
        });
        if job.v.include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        c
    };
    let choice =
        |i: usize, text: &str, lp: Option<Value>, finish: Option<&str>, first: bool| match job.kind
        {
            Kind::Completion => {
                json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
        };
    let send = |v: Value| SseEvent::default().data(v.to_string());
    let mut started = vec![false; total];
    let mut offsets = vec![0usize; total];
    let mut done = 0;
    let mut completion = 0;
    while done < total {
        let msg = match rx.recv().await {
            Some(Event::Token {
                choice: i,
                text,
                logprob,
                ..
            }) => {
                let first = !started[i];
                if text.is_empty() && logprob.is_none() && !first {
                    continue;
                }
                started[i] = true;
                let lp = logprob.map(|l| match job.kind {
                    Kind::Completion => api::completion_logprobs(&[(l, offsets[i])]),
                    Kind::Chat => api::chat_logprobs(&[l]),
                });
                offsets[i] += text.len();
                chunk(choice(i, &text, lp, None, first), None)
            }
            Some(Event::Done {
                choice: i,
                finish,
                completion_tokens,
                ..
            }) => {
                done += 1;
                completion += completion_tokens;
                let first = !started[i];
                started[i] = true;
                chunk(
                    choice(i, "", None, Some(api::finish_reason(finish)), first),
                    None,
                )
            }
            Some(Event::Failed(msg)) => engine_failed(msg).body(),
            None => engine_failed("the engine dropped the request".into()).body(),
        };
        let failed = msg.get("error").is_some();
        if out.send(Ok(send(msg))).await.is_err() || failed {
            return;
        }
    }
    if job.v.include_usage {
        let mut u = json!({
            "id": id, "object": object, "created": created, "model": job.model, "choices": [],
        });
        u["usage"] = usage_of(&job, completion);
        if out.send(Ok(send(u))).await.is_err() {
            return;
        }
    }
    let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
}
