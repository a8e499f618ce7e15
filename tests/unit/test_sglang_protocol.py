"""FAULT CASES of our SGLang client/engine against a tiny stand-in server. Not a test of SGLang.

Everything a real server can show is tested against a real one: tests/real_sglang (`make
test-sglang`, SGLang 0.5.23 on the CPU: /generate, every weight-sync mode, the API key, SIGKILL
restarts, the trainer end to end). What stays here is what a real server cannot be made to show
on this machine: a server that corrupts a tensor or ignores the version it is given, a weight
sample check (SGLang 0.5.23 has no /get_weights_by_name for Qwen3), a server without the 0.5.2x
endpoints (an older release: no weight-update sessions, no /model_info, no /server_info), a
crash in connect mode and a restart with no way to re-sync, the colocated memory hand-off (it
needs SGLang's GPU memory saver) across two servers, plus the pure request/launch mappings.

The stand-in (this file run as a script: `python test_sglang_protocol.py --serve --port P`)
speaks the subset of SGLang's native HTTP API that `rlrt_megatron.rollout.sglang` calls, with
the same JSON shapes (SGLang python/sglang/srt/entrypoints/http_server.py, io_struct.py), as an
older release did (no /begin_weight_update, /model_info or /server_info: they answer 404;
GET /get_server_info -> {"version": "0.4-stand-in"}):

  GET  /health                -> 200 (401 without `Authorization: Bearer <key>` if a key is set:
                                 --api-key, or `api-key:` in the --config YAML our launcher writes)
  GET  /get_weight_version    -> {"weight_version": "<str>"}  ("initial", our launch arg)
  POST /generate              {input_ids: [[int]], sampling_params: [{...}], rid: [str],
                               return_logprob: true}
                              -> [{text, output_ids, meta_info: {id, finish_reason: {type},
                                   weight_version, output_token_logprobs: [[lp, tok, null]]}}]
       fake model: sample j of prompt p emits token (p[-1] + 10*j + k + 1) % 97 for
       k < min(max_new_tokens, 4) with logprob -0.1*(k+1); finish "length" if it hit
       max_new_tokens else "stop".
  POST /update_weights_from_tensor   {serialized_named_tensors: [str]*tp, load_format,
                               flush_cache, weight_version} -> {success, message}
       (payload: base64(json [{name, dtype, shape, data}]) from the test serializer, so the
       stand-in needs no torch and starts in ~0.1 s; real SGLang gets CUDA IPC handles)
  POST /init_weights_update_group, /update_weights_from_distributed (gloo broadcast, src 0),
       /update_weights_from_disk (safetensors dir), /get_weights_by_name ({name, truncate_size}
       -> param[:truncate_size] as float lists), /release_memory_occupation,
       /resume_memory_occupation, /flush_cache
  Test-only knobs: POST /_test/config {corrupt: name, ignore_version: bool}; GET /_test/stats.
  Crash knobs: --crash-file F (exit on the next /generate if F exists, deleting it first),
  --crash-always (exit on every /generate). Crashes are os._exit mid-request.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# ----------------------------------------------------------------------------- stand-in server


class _State:
    def __init__(self, args):
        self.args = args
        self.version = "initial"  # what our launch command sets (--weight-version initial)
        self.weights = {}
        self.calls: dict[str, int] = {}
        self.auth_headers: list[str] = []
        self.generate_batch_sizes: list[int] = []
        self.memory_log: list[list] = []
        self.corrupt = None
        self.ignore_version = False
        self.group = None
        self.lock = threading.Lock()


def _make_handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep test output quiet
            pass

        def _send(self, code, obj=None):
            body = b"" if obj is None else json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _auth_ok(self) -> bool:
            got = self.headers.get("Authorization", "")
            state.auth_headers.append(got)
            if state.args.api_key and got != f"Bearer {state.args.api_key}":
                self._send(401, {"error": "unauthorized"})
                return False
            return True

        def do_GET(self):
            path = self.path
            with state.lock:
                state.calls[path] = state.calls.get(path, 0) + 1
            if not self._auth_ok():
                return
            if path == "/health":
                return self._send(200)
            if path == "/get_weight_version":
                return self._send(200, {"weight_version": state.version})
            if path == "/get_model_info":
                return self._send(200, {"model_path": "stand-in", "weight_version": state.version})
            if path == "/get_server_info":
                return self._send(200, {"version": "0.4-stand-in"})
            if path == "/_test/stats":
                return self._send(
                    200,
                    {
                        "calls": state.calls,
                        "auth": state.auth_headers[-1:],
                        "generate_batch_sizes": state.generate_batch_sizes,
                        "memory_log": state.memory_log,
                        "pid": os.getpid(),
                    },
                )
            self._send(404, {"error": path})

        def do_POST(self):
            path = self.path
            with state.lock:
                state.calls[path] = state.calls.get(path, 0) + 1
            if not self._auth_ok():
                return
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"null")
            handler = getattr(self, "_ep_" + path.strip("/").replace("/", "_"), None)
            if handler is None:
                return self._send(404, {"error": path})
            try:
                out = handler(body)
            except Exception as e:  # report like SGLang: success false + message
                return self._send(400, {"success": False, "message": f"{type(e).__name__}: {e}"})
            self._send(200, out)

        def _set_version(self, body):
            if body.get("weight_version") is not None and not state.ignore_version:
                state.version = body["weight_version"]

        def _store(self, name, shape, flat):
            """Weights are kept as (shape, flat list of floats): no torch needed."""
            flat = list(flat)
            if name == state.corrupt:
                flat[0] += 1.0
            state.weights[name] = (list(shape), flat)

        # -- endpoints
        def _ep_generate(self, body):
            args = state.args
            if args.crash_always or (args.crash_file and os.path.exists(args.crash_file)):
                if args.crash_file and os.path.exists(args.crash_file):
                    os.remove(args.crash_file)
                os._exit(3)
            ids, params, rids = body["input_ids"], body["sampling_params"], body["rid"]
            assert body["return_logprob"] is True
            state.generate_batch_sizes.append(len(ids))
            outs = []
            for prompt, p, rid in zip(ids, params, rids, strict=True):
                j = int(rid.rsplit("/", 1)[1])
                length = min(p["max_new_tokens"], 4)
                toks = [(prompt[-1] + 10 * j + k + 1) % 97 for k in range(length)]
                lps = [[-0.1 * (k + 1), t, None] for k, t in enumerate(toks)]
                finish = "length" if length == p["max_new_tokens"] else "stop"
                outs.append(
                    {
                        "text": " ".join(map(str, toks)),
                        "output_ids": toks,
                        "meta_info": {
                            "id": rid,
                            "finish_reason": {"type": finish},
                            "weight_version": state.version,
                            "prompt_tokens": len(prompt),
                            "completion_tokens": length,
                            "output_token_logprobs": lps,
                            "temperature_seen": p["temperature"],
                        },
                    }
                )
            return outs

        def _ep_flush_cache(self, body):
            return None

        def _ep_update_weights_from_tensor(self, body):
            payloads = body["serialized_named_tensors"]
            assert len(set(payloads)) == 1, "every TP rank gets the same payload"
            named = json.loads(base64.b64decode(payloads[0]))
            for item in named:
                self._store(item["name"], item["shape"], item["data"])
            self._set_version(body)
            return {"success": True, "message": f"{len(named)} tensors, tp={len(payloads)}"}

        def _ep_init_weights_update_group(self, body):
            sys.path.insert(0, os.getcwd())
            from rlrt_megatron.rollout.sglang import init_weight_transfer_group

            state.group = init_weight_transfer_group(
                body["backend"],
                body["master_address"],
                body["master_port"],
                body["rank_offset"],
                body["world_size"],
                body["group_name"],
                timeout_s=60,
            )
            return {"success": True, "message": "joined"}

        def _ep_update_weights_from_distributed(self, body):
            import torch
            import torch.distributed as dist

            for name, dtype, shape in zip(
                body["names"], body["dtypes"], body["shapes"], strict=True
            ):
                t = torch.empty(shape, dtype=getattr(torch, dtype))
                dist.broadcast(t, 0, group=state.group)
                self._store(name, shape, t.float().reshape(-1).tolist())
            self._set_version(body)
            return {"success": True, "message": f"{len(body['names'])} tensors"}

        def _ep_update_weights_from_disk(self, body):
            d = body["model_path"]
            with open(os.path.join(d, "model.safetensors.index.json")) as f:
                index = json.load(f)
            for fname in sorted(set(index["weight_map"].values())):
                for name, (shape, flat) in _read_safetensors(os.path.join(d, fname)).items():
                    self._store(name, shape, flat)
            self._set_version(body)
            return {"success": True, "message": "loaded"}

        def _ep_get_weights_by_name(self, body):
            shape, flat = state.weights[body["name"]]
            k = body["truncate_size"]
            if len(shape) == 1:
                return flat[:k]
            row = len(flat) // shape[0]
            return [flat[i * row : (i + 1) * row] for i in range(min(k, shape[0]))]

        def _ep_release_memory_occupation(self, body):
            state.memory_log.append(["release", body["tags"]])

        def _ep_resume_memory_occupation(self, body):
            state.memory_log.append(["resume", body["tags"]])

        def _ep__test_config(self, body):
            state.corrupt = body.get("corrupt")
            state.ignore_version = bool(body.get("ignore_version"))
            return {"success": True}

    return Handler


def _read_safetensors(path):
    """name -> (shape, flat floats), parsing the format by hand (8-byte header length, JSON
    header, raw little-endian data) so the stand-in needs no torch."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        raw = data[b:e]
        if info["dtype"] == "BF16":
            halves = struct.unpack(f"<{len(raw) // 2}H", raw)
            flat = [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
        elif info["dtype"] == "F32":
            flat = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        else:
            raise ValueError(f"stand-in: dtype {info['dtype']} not handled")
        out[name] = (info["shape"], flat)
    return out


def serve(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--config", default=None, help="YAML with `api-key: <json str>`")
    ap.add_argument("--crash-file", default=None)
    ap.add_argument("--crash-always", action="store_true")
    args = ap.parse_args(argv)
    if args.config:
        with open(args.config) as f:
            args.api_key = json.loads(f.read().split(":", 1)[1])
    print(f"stand-in SGLang server pid {os.getpid()} port {args.port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", args.port), _make_handler(_State(args))).serve_forever()


if __name__ == "__main__" and "--serve" in sys.argv:
    serve()
    sys.exit(0)

# ----------------------------------------------------------------------------- the tests

import pytest  # noqa: E402
import torch  # noqa: E402

from rlrt_megatron.rollout.base import GenerateRequest, RolloutEngine, SamplingParams  # noqa: E402
from rlrt_megatron.rollout.sglang import (  # noqa: E402
    RolloutServerCrashed,
    SGLangClient,
    SGLangEngine,
    SGLangError,
    build_generate_payload,
    build_launch_command,
    expand_samples,
    free_port,
    parse_generate_output,
    require_sglang,
    sampling_to_sglang,
    serialize_for_sglang,
)
from rlrt_megatron.rollout.weight_sync import (  # noqa: E402
    WeightMismatch,
    WeightSyncError,
    WeightVersionMismatch,
)

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
KEY = "test-key-123"


def stand_in_cmd(port, *extra):
    """The stand-in's command for SGLangEngine to launch (the key comes in its --config)."""
    return [sys.executable, HERE, "--serve", "--port", str(port), *extra]


def json_serializer(bucket):
    """Test serializer: the stand-in runs in another process without a GPU, so the tensors
    travel by value (JSON floats; exact for bf16) instead of SGLang's CUDA IPC handles."""
    items = [
        {"name": n, "dtype": str(t.dtype), "shape": list(t.shape),
         "data": t.detach().float().reshape(-1).tolist()}
        for n, t in bucket
    ]  # fmt: skip
    return base64.b64encode(json.dumps(items).encode()).decode(), None


def stats(url):
    return SGLangClient(url, KEY).request("GET", "/_test/stats")


def tiny_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    names = [
        ("model.embed_tokens.weight", (64, 16)),
        ("model.layers.0.self_attn.q_proj.weight", (16, 16)),
        ("model.layers.0.input_layernorm.weight", (16,)),
        ("model.layers.0.mlp.down_proj.weight", (16, 32)),
        ("lm_head.weight", (64, 16)),
    ]
    return [(n, torch.randn(s, generator=g).to(torch.bfloat16)) for n, s in names]


@pytest.fixture(scope="module")
def weight_server(tmp_path_factory):
    """One long-lived stand-in shared by the sync tests (imports torch for the gloo group)."""
    import subprocess

    port = free_port()
    log = open(tmp_path_factory.mktemp("standin") / "server.log", "w")
    cmd = [*stand_in_cmd(port), "--api-key", KEY]  # started by the test, not the engine
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    client = SGLangClient(url, KEY)
    deadline = time.monotonic() + 60
    while not client.health(timeout=2):
        assert proc.poll() is None and time.monotonic() < deadline, "stand-in did not start"
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


def connect(url, **kw):
    kw.setdefault("serializer", json_serializer)
    return SGLangEngine.connect([url], api_key=KEY, **kw)


# -- pure mapping


def test_launch_command_has_the_flags_we_rely_on():
    cmd = build_launch_command("/m/qwen", port=30011, tp=2, base_gpu_id=4, mem_fraction=0.4, seed=7)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    switches = {"--trust-remote-code", "--enable-memory-saver"}
    flags = {f: cmd[cmd.index(f) + 1] for f in cmd if f.startswith("--") and f not in switches}
    assert flags["--model-path"] == "/m/qwen" and flags["--port"] == "30011"
    assert flags["--tp-size"] == "2" and flags["--base-gpu-id"] == "4"
    assert flags["--host"] == "127.0.0.1" and "--api-key" not in flags  # never in argv
    assert flags["--weight-version"] == "initial" and flags["--mem-fraction-static"] == "0.4"
    assert "--enable-memory-saver" in cmd and "--trust-remote-code" in cmd
    assert flags["--random-seed"] == "7" and flags["--dtype"] == "bfloat16"
    sep = build_launch_command("/m", port=1, colocated=False, extra_args=["--x", "1"])
    assert "--enable-memory-saver" not in sep and sep[-2:] == ["--x", "1"]
    assert "--api-key" not in sep


def test_generate_payload_and_parse_round_trip():
    reqs = [GenerateRequest([5, 6, 7], "a"), GenerateRequest([9], "b")]
    sp = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, stop=("</s>",))
    samples = expand_samples(reqs, sp.n)
    assert [s.rid for s in samples] == ["a/0", "a/1", "b/0", "b/1"]
    payload = build_generate_payload(reqs, samples, sp)
    assert payload["input_ids"] == [[5, 6, 7], [5, 6, 7], [9], [9]]
    assert payload["return_logprob"] is True and payload["rid"] == ["a/0", "a/1", "b/0", "b/1"]
    assert payload["sampling_params"][0] == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "max_new_tokens": 8,
        "stop": ["</s>"],
    }
    seeded = build_generate_payload(reqs, samples, SamplingParams(n=2, seed=11))
    seeds = [p["sampling_seed"] for p in seeded["sampling_params"]]
    assert len(set(seeds)) == 4 and seeds[0] == 11
    assert "stop" not in sampling_to_sglang(SamplingParams())
    out = {
        "text": "x y",
        "output_ids": [3, 4],
        "meta_info": {
            "id": "b/1",
            "finish_reason": {"type": "stop", "matched": 4},
            "weight_version": "5",
            "output_token_logprobs": [[-0.5, 3, None], [-1.25, 4, None]],
        },
    }
    c = parse_generate_output(out, reqs[1], samples[3])
    assert (c.request_id, c.token_ids, c.logprobs) == ("b", [3, 4], [-0.5, -1.25])
    assert (c.finish_reason, c.weight_version, c.text) == ("stop", 5, "x y")
    assert c.prompt_token_ids == [9] and c.meta["sample_index"] == 1
    out["meta_info"]["weight_version"] = "initial"  # never synced: the launch weights
    assert parse_generate_output(out, reqs[1], samples[3]).weight_version == -1
    out["output_ids"] = [3, 5]
    with pytest.raises(SGLangError, match="disagree"):
        parse_generate_output(out, reqs[1], samples[3])
    with pytest.raises(ValueError, match="unique"):
        expand_samples([GenerateRequest([1], "x"), GenerateRequest([2], "x")], 1)


def test_missing_sglang_names_the_gpu_extra():
    try:
        import sglang  # noqa: F401

        pytest.skip("sglang is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"\.\[gpu\]"):
        require_sglang()
    with pytest.raises(ImportError, match="gpu"):
        SGLangEngine("/some/model")


def test_fallback_serializer_is_sglangs_default_format():
    """Without SGLang installed we emit base64(ForkingPickler([(name, tensor)])), the payload
    SGLang's default load_format (None) unpickles; checked in-process (CPU tensors)."""
    from multiprocessing.reduction import ForkingPickler

    try:
        import sglang  # noqa: F401

        pytest.skip("sglang installed: its own serializer is used")
    except ImportError:
        pass
    bucket = tiny_weights()[:3]
    payload, load_format = serialize_for_sglang(bucket)
    assert load_format is None
    back = ForkingPickler.loads(base64.b64decode(payload))
    assert [n for n, _ in back] == [n for n, _ in bucket]
    for (_, a), (_, b) in zip(back, bucket, strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype


# -- against the stand-in


def test_generate_across_two_launched_servers_with_api_key(tmp_path):
    ports = []

    def cmd(i, port):
        ports.append(port)
        return stand_in_cmd(port)

    with SGLangEngine(
        "stand-in", num_servers=2, api_key=KEY, launch_cmd=cmd, log_dir=str(tmp_path)
    ) as eng:
        assert isinstance(eng, RolloutEngine) and eng.health()
        reqs = [GenerateRequest([1, 2, 10 * i], f"p{i}") for i in range(3)]
        out = eng.generate(reqs, SamplingParams(n=2, max_new_tokens=3, temperature=0.5))
        assert [len(g) for g in out] == [2, 2, 2]
        for i, group in enumerate(out):
            for j, c in enumerate(group):
                assert c.request_id == f"p{i}" and c.meta["sample_index"] == j
                assert c.token_ids == [(10 * i + 10 * j + k + 1) % 97 for k in range(3)]
                assert c.logprobs == pytest.approx([-0.1, -0.2, -0.3])
                assert c.finish_reason == "length" and c.weight_version == -1
        assert eng.generate([], SamplingParams(n=2)) == []
        short = eng.generate(reqs[:1], SamplingParams(n=1, max_new_tokens=9))
        assert short[0][0].finish_reason == "stop" and len(short[0][0].token_ids) == 4
        s0, s1 = (stats(s.url) for s in eng.servers)
        # colocated (the default): KV cache handed back after each generate, resumed before
        assert s0["memory_log"] == [
            ["release", ["kv_cache"]],
            ["resume", ["kv_cache"]],
            ["release", ["kv_cache"]],
        ]
        # 6 samples split 3/3; a single sample goes to the last server (bounds [0, 0, 1])
        assert s0["generate_batch_sizes"] == [3] and s1["generate_batch_sizes"] == [3, 1]
        assert s0["auth"] == [f"Bearer {KEY}"]
        pids = [s.proc.pid for s in eng.servers]
        assert len(set(ports)) == 2
    for pid in pids:  # shutdown stopped exactly the processes we started
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_connect_mode_cannot_restart(tmp_path):
    import subprocess

    port = free_port()
    proc = subprocess.Popen([*stand_in_cmd(port, "--crash-always"), "--api-key", KEY], cwd=ROOT)
    try:
        eng = SGLangEngine.connect([f"http://127.0.0.1:{port}"], api_key=KEY, startup_timeout=30)
        with pytest.raises(RolloutServerCrashed, match="connect mode"):
            eng.generate([GenerateRequest([1], "q")], SamplingParams(max_new_tokens=1))
        eng.shutdown()  # must not touch a process it did not start
    finally:
        proc.wait(10)


def test_tensor_sync_buckets_version_and_sample_check(weight_server):
    eng = connect(weight_server, bucket_bytes=1200, verify_stride=1, verify_rows=3)
    weights = tiny_weights(1)
    st = eng.update_weights(iter(weights), version=1)
    assert eng.weight_version == 1
    assert SGLangClient(weight_server, KEY).get_weight_version() == "1"
    # 64x16 bf16 = 2048 B > 1200: alone; 16x16 (512) + 16 (32) share; 16x32 (1024) alone
    assert st["buckets"] == 4 and st["checked"] == 5
    assert st["bytes"] == sum(t.numel() * 2 for _, t in weights)
    out = eng.generate([GenerateRequest([3], "r")], SamplingParams(max_new_tokens=1))
    assert out[0][0].weight_version == 1


def test_an_older_server_gets_pushes_without_sessions_and_404s_name_its_release(weight_server):
    client = SGLangClient(weight_server, KEY)
    assert client.begin_weight_update() is False  # no sessions: pushes go alone
    assert client.get_weight_version() and client._version_path == "/get_weight_version"
    with pytest.raises(
        SGLangError, match=r"SGLang 0\.4-stand-in at .* has no /update_weights_from_ipc"
    ):
        client._update("/update_weights_from_ipc", {})


def test_sample_check_detects_a_corrupted_tensor(weight_server):
    client = SGLangClient(weight_server, KEY)
    client.request("POST", "/_test/config", {"corrupt": "model.layers.0.mlp.down_proj.weight"})
    try:
        eng = connect(weight_server, verify_stride=1)
        with pytest.raises(WeightMismatch, match="down_proj"):
            eng.update_weights(iter(tiny_weights(2)), version=2)
        # stride 2 at version 3 checks tensors 1 and 3 (rotates with the version)
        eng = connect(weight_server, verify_stride=2)
        with pytest.raises(WeightMismatch, match="down_proj"):
            eng.update_weights(iter(tiny_weights(2)), version=3)
        eng.update_weights(iter(tiny_weights(2)), version=4)  # checks 0, 2, 4 only: passes
    finally:
        client.request("POST", "/_test/config", {})


def test_version_mismatch_is_a_clear_error(weight_server):
    client = SGLangClient(weight_server, KEY)
    before = client.get_weight_version()
    client.request("POST", "/_test/config", {"ignore_version": True})
    try:
        with pytest.raises(WeightVersionMismatch, match=f"weight_version='{before}'.*version 7"):
            connect(weight_server).update_weights(iter(tiny_weights()), version=7)
    finally:
        client.request("POST", "/_test/config", {})


def test_release_and_resume_memory(weight_server):
    """Colocated hand-off: released weights must be re-synced before sampling again; resumes
    happen only for what was released (SGLang errors on resuming a resident tag)."""
    eng = connect(weight_server)
    n0 = len(stats(weight_server)["memory_log"])
    eng.release_memory()
    eng.release_memory(["kv_cache"])  # already released: no call
    with pytest.raises(WeightSyncError, match="released its weights"):
        eng.generate([GenerateRequest([1], "m")], SamplingParams(max_new_tokens=1))
    eng.update_weights(iter(tiny_weights()), version=11)  # resumes the weights first
    eng.generate([GenerateRequest([1], "m")], SamplingParams(max_new_tokens=1))
    assert stats(weight_server)["memory_log"][n0:] == [
        ["release", ["kv_cache", "weights"]],
        ["resume", ["weights"]],
        ["resume", ["kv_cache"]],
    ]


def test_restart_resyncs_weights_or_fails(tmp_path):
    """A restarted server reloads the initial weights: on_restart (or the host-memory cache of
    the last sync) must re-sync them, else the version check after the restart fails the step
    (never silently stale weights)."""
    crash = tmp_path / "crash_once"
    resynced = []

    def resync(engine, i):
        resynced.append(i)
        engine.update_weights(iter(tiny_weights(5)), engine.weight_version, servers=[i])

    def make(on_restart, restart_cache=False):
        return SGLangEngine(
            "stand-in",
            api_key=KEY,
            launch_cmd=lambda i, p: stand_in_cmd(p, "--crash-file", str(crash)),
            log_dir=str(tmp_path),
            serializer=json_serializer,
            on_restart=on_restart,
            restart_cache=restart_cache,
            verify_stride=1,
        )

    with make(resync) as eng:
        eng.update_weights(iter(tiny_weights(5)), version=3)
        crash.write_text("1")
        out = eng.generate([GenerateRequest([2], "s")], SamplingParams(max_new_tokens=1))
        assert resynced == [0] and out[0][0].weight_version == 3
    with make(None, restart_cache=True) as eng:
        eng.update_weights(iter(tiny_weights(6)), version=4)
        crash.write_text("1")
        out = eng.generate([GenerateRequest([2], "s")], SamplingParams(max_new_tokens=1))
        assert eng.restarts == 1 and out[0][0].weight_version == 4
        # the cached copy re-synced the restarted server (the sample check compared it)
        assert stats(eng.servers[0].url)["calls"]["/get_weights_by_name"] == 5
    with make(None) as eng:
        eng.update_weights(iter(tiny_weights(5)), version=3)
        crash.write_text("1")
        with pytest.raises(RolloutServerCrashed, match="weight_version='initial'.*version 3"):
            eng.generate([GenerateRequest([2], "s")], SamplingParams(max_new_tokens=1))


def test_launched_servers_get_an_api_key_by_default(monkeypatch):
    monkeypatch.delenv("RLRT_ROLLOUT_API_KEY", raising=False)
    seen = {}

    class NoLaunch(SGLangEngine):
        def _start(self, s):
            seen["key"] = self.api_key

        def wait_healthy(self, servers=None):
            pass

    NoLaunch("m", launch_cmd=lambda i, p: ["true"])
    assert seen["key"] and len(seen["key"]) >= 24
    monkeypatch.setenv("RLRT_ROLLOUT_API_KEY", "from-env")
    NoLaunch("m", launch_cmd=lambda i, p: ["true"])
    assert seen["key"] == "from-env"
