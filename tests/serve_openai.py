"""`moe serve` through the real `openai` client (run by tests/serve.rs against a tiny model).

Usage: serve_openai.py BASE_URL API_KEY MODEL REFERENCE_JSON
REFERENCE_JSON: {"max_tokens": N, "completions": {prompt: text}, "chat": {"prompt": str, "max_tokens": N,
"text": str}}: `moe generate`'s greedy outputs (--ignore-eos), which the server must reproduce
token for token whatever else it is serving. Every request has a client timeout; exits non-zero on
the first failure.
"""

import concurrent.futures
import http.client
import json
import sys
import time

import urllib.error
import urllib.request

try:
    import openai
except ImportError as e:  # tests/serve.rs checks this first; keep the message plain here too
    sys.exit(f"missing Python package: {e.name} (python3 -m pip install openai)")

BASE, KEY, MODEL, REF = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ref = json.load(open(REF))
MAX = ref["max_tokens"]
COMPLETIONS = ref["completions"]
PROMPTS = list(COMPLETIONS)
GREEDY = {"temperature": 0, "max_tokens": MAX, "extra_body": {"ignore_eos": True}}

client = openai.OpenAI(base_url=f"{BASE}/v1", api_key=KEY, timeout=60, max_retries=0)
checks = 0


def post(path, body, headers):
    """(status, parsed JSON body) of a raw POST (stdlib: the cases a client library refuses to send)."""
    req = urllib.request.Request(f"{BASE}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(path):
    with urllib.request.urlopen(f"{BASE}{path}", timeout=30) as r:
        return r.status, r.read().decode()


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


def stream_text(prompt, **kw):
    parts, finish, usage = [], None, None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, stream=True, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.text)
            finish = c.finish_reason or finish
    return "".join(parts), finish, usage


def basics():
    ids = [m.id for m in client.models.list().data]
    check(ids == [MODEL], f"models: {ids}")
    for p in PROMPTS:
        r = client.completions.create(model=MODEL, prompt=p, **GREEDY)
        check(r.choices[0].text == COMPLETIONS[p], f"{p!r}: {r.choices[0].text!r} != {COMPLETIONS[p]!r}")
        check(r.choices[0].finish_reason == "length", r.choices[0].finish_reason)
        u = r.usage
        check((u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(p.encode()), MAX, len(p.encode()) + MAX),
              f"usage {u}")
        text, finish, usage = stream_text(p, stream_options={"include_usage": True}, **GREEDY)
        check(text == COMPLETIONS[p], f"stream {p!r}: {text!r}")
        check(finish == "length", finish)
        check(usage is not None and usage.completion_tokens == MAX, f"stream usage {usage}")

    # Stop strings: the text ends before the first stop string, finish_reason "stop".
    p = PROMPTS[0]
    full = COMPLETIONS[p]
    stop = full[3:5]
    r = client.completions.create(model=MODEL, prompt=p, stop=[stop, "\x00never"], **GREEDY)
    check(r.choices[0].text == full[: full.find(stop)], f"stop {stop!r}: {r.choices[0].text!r}")
    check(r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)
    text, finish, _ = stream_text(p, stop=stop, **GREEDY)
    check((text, finish) == (full[: full.find(stop)], "stop"), f"stream stop: {text!r} {finish}")

    # n > 1: greedy choices all equal; seeded sampling reproducible.
    r = client.completions.create(model=MODEL, prompt=p, n=3, **GREEDY)
    check([c.index for c in r.choices] == [0, 1, 2], r.choices)
    check(all(c.text == full for c in r.choices), [c.text for c in r.choices])
    check(r.usage.completion_tokens == 3 * MAX, r.usage)
    # A list of prompts: choice index = prompt index x n + completion index.
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, **GREEDY)
    want = [COMPLETIONS[PROMPTS[0]]] * 2 + [COMPLETIONS[PROMPTS[1]]] * 2
    check([c.text for c in sorted(r.choices, key=lambda c: c.index)] == want, r.choices)
    check(r.usage.prompt_tokens == len(PROMPTS[0]) + len(PROMPTS[1]), r.usage)
    sampled = dict(temperature=1.0, top_p=0.9, seed=7, n=2, max_tokens=MAX, extra_body={"ignore_eos": True, "top_k": 20})
    a = client.completions.create(model=MODEL, prompt=p, **sampled)
    b = client.completions.create(model=MODEL, prompt=p, **sampled)
    check([c.text for c in a.choices] == [c.text for c in b.choices], "seeded sampling differs between runs")

    # Logprobs: the greedy pick is the most likely token.
    r = client.completions.create(model=MODEL, prompt=p, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    check(len(lp.tokens) == MAX and len(lp.token_logprobs) == MAX and len(lp.top_logprobs) == MAX, lp)
    for t, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        check(len(top) == 2 and l <= 0 and abs(max(top.values()) - l) < 1e-5, (t, l, top))

    # Chat, plain and streamed, against `moe generate --chat`.
    c = ref["chat"]
    msgs = [{"role": "user", "content": c["prompt"]}]
    kw = dict(model=MODEL, messages=msgs, temperature=0, max_tokens=c["max_tokens"], extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    check(r.choices[0].message.role == "assistant", r.choices[0].message)
    check(r.choices[0].message.content == c["text"], f"chat {r.choices[0].message.content!r} != {c['text']!r}")
    check(r.usage.completion_tokens == c["max_tokens"], r.usage)
    parts = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        parts.extend(ch.delta.content or "" for ch in chunk.choices)
    check("".join(parts) == c["text"], f"chat stream {''.join(parts)!r}")
    r = client.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
    content = r.choices[0].logprobs.content
    check(len(content) == c["max_tokens"] and all(len(t.top_logprobs) == 3 for t in content), content)


def one_stream(i):
    p = PROMPTS[i % len(PROMPTS)]
    text, finish, _ = stream_text(p, **GREEDY)
    return p, text, finish


def load(streams=32, each=4):
    """`streams` concurrent clients × `each` streamed requests, every output the greedy one."""
    t = time.time()
    errors = []
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        futs = [pool.submit(one_stream, i) for i in range(streams * each)]
        for f in concurrent.futures.as_completed(futs, timeout=120):
            try:
                p, text, finish = f.result()
                if text != COMPLETIONS[p] or finish != "length":
                    errors.append(f"{p!r}: {text!r} ({finish})")
            except Exception as e:  # noqa: BLE001 - every failure is reported
                errors.append(repr(e))
    check(not errors, f"{len(errors)} of {streams * each} load requests failed: {errors[:3]}")
    print(f"load: {streams} streams x {each} requests in {time.time() - t:.1f} s, 0 errors")


def bad_inputs():
    """4xx with an OpenAI error object, while a long stream keeps being served."""
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{BASE}/v1/completions"
    p = PROMPTS[0]
    ok = {"model": MODEL, "prompt": p, "max_tokens": 4}
    cases = [
        ("malformed JSON", b'{"model": ', h, 400),
        ("missing prompt", json.dumps({"model": MODEL}).encode(), h, 400),
        ("unknown model", json.dumps({**ok, "model": "nope"}).encode(), h, 404),
        ("prompt over the context", json.dumps({**ok, "prompt": "x" * 5000}).encode(), h, 400),
        ("max_tokens over the limit", json.dumps({**ok, "max_tokens": 100000}).encode(), h, 400),
        ("temperature out of range", json.dumps({**ok, "temperature": 3}).encode(), h, 400),
        ("top_p out of range", json.dumps({**ok, "top_p": 1.5}).encode(), h, 400),
        ("oversize body", json.dumps({**ok, "prompt": "y" * (5 << 20)}).encode(), h, 413),
        ("wrong API key", json.dumps(ok).encode(), {**h, "Authorization": "Bearer wrong"}, 401),
        ("no API key", json.dumps(ok).encode(), {"Content-Type": "application/json"}, 401),
    ]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(one_stream, 0)
        for name, body, headers, status in cases:
            code, js = post("/v1/completions", body, headers)
            err = js.get("error", {})
            check(code == status, f"{name}: {code} {js}")
            check(isinstance(err.get("message"), str) and err.get("type"), f"{name}: {js}")
        code, js = post("/v1/chat/completions", b"[]", h)
        check(code == 400 and "error" in js, f"chat list body: {code} {js}")
        p0, text, finish = busy.result(timeout=60)
        check(text == COMPLETIONS[p0], "a request served beside bad ones changed")
    try:
        client.completions.create(model="nope", prompt=p, max_tokens=2)
        check(False, "unknown model accepted")
    except openai.NotFoundError as e:
        check(e.body and "model" in e.body.get("message", ""), e.body)


def disconnect_and_health():
    """A client that leaves mid-stream frees its row; /health and /metrics answer after the load."""
    host, port = BASE.removeprefix("http://").split(":")
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "stream": True, "temperature": 0,
            "ignore_eos": True}
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    check(r.status == 200, f"stream status {r.status}")
    r.readline()
    conn.sock.close()  # leave mid-stream
    conn.close()
    deadline = time.time() + 20
    metrics = ""
    while time.time() < deadline:
        metrics = get("/metrics")[1]
        if "moe_sequences_aborted_total 0" not in metrics and "moe_num_requests_running 0" in metrics:
            break
        time.sleep(0.2)
    check("moe_num_requests_running 0" in metrics, "rows still in use after every client left")
    check("moe_sequences_aborted_total 0" not in metrics, "the disconnected stream was not aborted")
    check(get("/health")[0] == 200, "health")
    for name in ["moe_requests_total{route=\"/v1/completions\",status=\"200\"}",
                 "moe_requests_total{route=\"/v1/completions\",status=\"400\"}",
                 "moe_time_to_first_token_seconds_count", "moe_inter_token_latency_seconds_bucket",
                 "moe_generation_tokens_total", "moe_kv_cache_rows_total"]:
        check(name in metrics, f"/metrics lacks {name}")


basics()
load()
bad_inputs()
disconnect_and_health()
print(f"{checks} passed, 0 failed")
