//! OpenAI's completions and chat completions schema: request bodies (serde), their validation
//! into an engine `Request` (4xx `ApiError`s naming the field and value), and the response,
//! streaming chunk and error objects as OpenAI documents them.

use serde::Deserialize;
use serde_json::{json, Value};

use super::engine::TokenLogprob;
use crate::infer::{Finish, SamplingParams};

/// Most completions one request may ask for (n × prompts).
pub const MAX_CHOICES: usize = 64;
/// Most alternatives `logprobs` / `top_logprobs` may ask for.
pub const MAX_LOGPROBS: usize = 20;
/// Most stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// An OpenAI error: HTTP status and `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: text, texts, token ids, or lists of token ids.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The sampling and stopping fields both endpoints take.
#[derive(Deserialize, Debug, Default)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's extension: -1 or 0 = off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub n: Option<usize>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
}

/// POST /v1/completions.
#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Alternatives per token to return (0: only the chosen token's log-probability).
    pub logprobs: Option<usize>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: Common,
}

/// A chat message's content: text, or a list of parts of which the text ones are joined.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// POST /v1/chat/completions.
#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub common: Common,
}

impl ChatMessage {
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            format!(
                                "content part of type {:?}: only \"text\" parts are supported",
                                p.kind
                            ),
                        ));
                    }
                    out += p.text.as_deref().unwrap_or("");
                }
                Ok(out)
            }
        }
    }
}

/// The server's limits and the model's defaults that validation applies.
pub struct Limits {
    pub served_model: String,
    pub max_model_len: usize,
    pub vocab: usize,
    /// generation_config.json's sampling values (vLLM's `--generation-config auto`).
    pub defaults: crate::infer::GenerationDefaults,
}

/// A validated request, before its prompts are in the engine.
#[derive(Debug)]
pub struct Validated {
    pub sampling: SamplingParams,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

fn in_range(
    param: &'static str,
    v: Option<f32>,
    lo: f32,
    hi: f32,
    default: f32,
) -> Result<f32, ApiError> {
    let x = v.unwrap_or(default);
    if !(x.is_finite() && x >= lo && x <= hi) {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param} = {x}: must be in [{lo}, {hi}]"),
        ));
    }
    Ok(x)
}

/// Checks the model name and the sampling fields.
pub fn validate(c: &Common, lim: &Limits, prompts: usize) -> Result<Validated, ApiError> {
    if c.model != lim.served_model {
        return Err(ApiError {
            status: 404,
            message: format!(
                "The model `{}` does not exist; this server serves `{}`",
                c.model, lim.served_model
            ),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    let d = &lim.defaults;
    let temperature = in_range(
        "temperature",
        c.temperature.or(d.temperature),
        0.0,
        2.0,
        1.0,
    )?;
    let top_p = in_range("top_p", c.top_p.or(d.top_p), 0.0, 1.0, 1.0)?;
    if top_p == 0.0 {
        return Err(ApiError::invalid(
            Some("top_p"),
            "top_p = 0: must be in (0, 1]",
        ));
    }
    let min_p = in_range("min_p", c.min_p.or(d.min_p), 0.0, 1.0, 0.0)?;
    let top_k = match c.top_k {
        Some(k) if k < -1 => {
            return Err(ApiError::invalid(
                Some("top_k"),
                format!("top_k = {k}: must be -1 or 0 (off) or a positive count"),
            ))
        }
        Some(k) => k.max(0) as usize,
        None => d.top_k.unwrap_or(0),
    };
    let frequency_penalty = in_range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, 0.0)?;
    let presence_penalty = in_range("presence_penalty", c.presence_penalty, -2.0, 2.0, 0.0)?;
    let repetition_penalty = c.repetition_penalty.or(d.repetition_penalty).unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(ApiError::invalid(
            Some("repetition_penalty"),
            format!(
                "repetition_penalty = {repetition_penalty}: must be a finite value > 0 (1 = off)"
            ),
        ));
    }
    let n = c.n.unwrap_or(1);
    if n == 0 || n * prompts > MAX_CHOICES {
        return Err(ApiError::invalid(
            Some("n"),
            format!(
                "n = {n} for {prompts} prompt(s): between 1 and {MAX_CHOICES} completions in all"
            ),
        ));
    }
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("stop = {stop:?}: at most {MAX_STOP} non-empty strings"),
        ));
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            Some("stream_options"),
            "stream_options is only allowed when stream is true",
        ));
    }
    let sampling = SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        // No seed: a fresh one per request (OpenAI's sampling is not reproducible without one).
        seed: match c.seed {
            Some(s) => s as u64,
            None => rand::random(),
        },
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(None, e))?;
    Ok(Validated {
        sampling,
        frequency_penalty,
        presence_penalty,
        n,
        stop,
        stream,
        include_usage: c
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        ignore_eos: c.ignore_eos.unwrap_or(false),
    })
}

/// Checks a tokenized prompt against the context and returns the completion's token budget:
/// `max_tokens`, or by default `default` capped by what the context leaves.
pub fn budget(
    param: &'static str,
    prompt: &[u32],
    max_tokens: Option<usize>,
    default: Option<usize>,
    lim: &Limits,
) -> Result<usize, ApiError> {
    let ctx = lim.max_model_len;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param}: the prompt is empty (no tokens to start from)"),
        ));
    }
    if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= lim.vocab) {
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "{param}: token id {bad} is outside the vocabulary of {}",
                lim.vocab
            ),
        ));
    }
    if prompt.len() >= ctx {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                Some(param),
                format!(
                    "This model's maximum context length is {ctx} tokens. However, your \
                     {param} has {} tokens, leaving no room for a completion.",
                    prompt.len()
                ),
            )
        });
    }
    let room = ctx - prompt.len();
    match max_tokens {
        Some(0) => Err(ApiError::invalid(
            Some("max_tokens"),
            "max_tokens = 0: must be at least 1",
        )),
        Some(m) if m > room => Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "This model's maximum context length is {ctx} tokens. However, you \
                     requested {} tokens ({} in the {param}, {m} in the completion).",
                    prompt.len() + m,
                    prompt.len()
                ),
            )
        }),
        Some(m) => Ok(m),
        None => Ok(default.unwrap_or(room).min(room)),
    }
}

/// OpenAI's finish_reason.
pub fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Eos | Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// The completions endpoint's logprobs object for some tokens; `offset` is the text length
/// before the first of them.
pub fn completion_logprobs(lps: &[(TokenLogprob, usize)]) -> Value {
    let top: Vec<Value> = lps
        .iter()
        .map(|(l, _)| {
            let m: serde_json::Map<String, Value> =
                l.top.iter().map(|(t, p)| (t.clone(), json!(p))).collect();
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": lps.iter().map(|(l, _)| &l.token).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|(l, _)| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": lps.iter().map(|(_, o)| o).collect::<Vec<_>>(),
    })
}

/// The chat endpoint's logprobs object (`{"content": [...]}`).
pub fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let entry = |t: &str, p: f32| json!({"token": t, "logprob": p, "bytes": t.as_bytes()});
    json!({"content": lps.iter().map(|l| {
        let mut e = entry(&l.token, l.logprob);
        e["top_logprobs"] = l.top.iter().map(|(t, p)| entry(t, *p)).collect::<Vec<_>>().into();
        e
    }).collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            served_model: "m".into(),
            max_model_len: 10,
            vocab: 100,
            defaults: Default::default(),
        }
    }

    fn common(v: Value) -> Common {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn fields_are_checked_and_named() {
        let lim = limits();
        let ok = validate(&common(json!({"model": "m", "temperature": 0})), &lim, 1).unwrap();
        assert_eq!(ok.sampling.temperature, 0.0);
        assert_eq!((ok.n, ok.stream), (1, false));
        let e = validate(&common(json!({"model": "x"})), &lim, 1).unwrap_err();
        assert_eq!((e.status, e.code), (404, Some("model_not_found")));
        for (field, value) in [
            ("temperature", json!(2.5)),
            ("top_p", json!(0)),
            ("top_p", json!(1.5)),
            ("min_p", json!(-0.1)),
            ("top_k", json!(-2)),
            ("frequency_penalty", json!(3)),
            ("presence_penalty", json!(-2.5)),
            ("repetition_penalty", json!(0)),
            ("n", json!(0)),
            ("n", json!(65)),
            ("stop", json!(["a", "b", "c", "d", "e"])),
            ("stop", json!("")),
            ("stream_options", json!({"include_usage": true})),
        ] {
            let mut body = json!({"model": "m"});
            body[field] = value.clone();
            let e = validate(&common(body), &lim, 1).unwrap_err();
            assert_eq!(e.status, 400, "{field} = {value}");
            assert!(e.message.contains(field), "{field}: {}", e.message);
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
        let s = validate(
            &common(json!({"model": "m", "stop": ["x", "yz"], "n": 3, "seed": -1})),
            &lim,
            1,
        )
        .unwrap();
        assert_eq!(s.stop, vec!["x".to_string(), "yz".to_string()]);
        assert_eq!(s.sampling.seed, u64::MAX);
    }

    #[test]
    fn prompt_and_max_tokens_fit_the_context() {
        let lim = limits();
        assert_eq!(
            budget("prompt", &[1, 2, 3], Some(7), None, &lim).unwrap(),
            7
        );
        assert_eq!(
            budget("prompt", &[1, 2, 3], None, Some(16), &lim).unwrap(),
            7
        );
        assert_eq!(
            budget("prompt", &[1, 2, 3], None, Some(2), &lim).unwrap(),
            2
        );
        let e = budget("prompt", &[1, 2, 3], Some(8), None, &lim).unwrap_err();
        assert_eq!((e.status, e.param), (400, Some("max_tokens")));
        assert!(e.message.contains("requested 11 tokens"), "{}", e.message);
        let e = budget("prompt", &[1; 10], Some(1), None, &lim).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(budget("prompt", &[], Some(1), None, &lim).is_err());
        assert!(budget("prompt", &[100], Some(1), None, &lim).is_err());
        assert!(budget("prompt", &[1], Some(0), None, &lim).is_err());
    }

    #[test]
    fn bodies_parse_as_openai_sends_them() {
        let r: CompletionRequest = serde_json::from_value(json!({
            "model": "m", "prompt": ["a"], "stop": "x", "stream": true,
            "stream_options": {"include_usage": true}, "logprobs": 2, "user": "ignored"
        }))
        .unwrap();
        assert!(matches!(r.prompt, Prompt::Texts(ref t) if t == &["a"]));
        assert_eq!(r.logprobs, Some(2));
        assert!(r.common.stream_options.unwrap().include_usage.unwrap());
        let r: CompletionRequest =
            serde_json::from_value(json!({"model": "m", "prompt": [1, 2]})).unwrap();
        assert!(matches!(r.prompt, Prompt::Ids(ref t) if t == &[1, 2]));
        let c: ChatRequest = serde_json::from_value(json!({
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        }))
        .unwrap();
        assert_eq!(c.messages[0].text().unwrap(), "hi");
        let e = serde_json::from_value::<ChatRequest>(json!({"messages": []})).unwrap_err();
        assert!(e.to_string().contains("missing field `model`"), "{e}");
    }
}
