"""Start and talk to real SGLang server processes (tests, examples, benchmarks, GPU check).

    with launch_server(model_dir, port, ["--speculative-algo", "specsa"], cpu=True) as srv:
        out = srv.generate(input_ids=[...], max_new_tokens=16)   # greedy
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .cpu_platform import PLATFORM_NAME


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The server process exited or did not become healthy; the message holds its log tail."""


def _http(url: str, payload: dict | None = None, timeout: float = 600.0) -> tuple[int, dict | str]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def post(self, path: str, payload: dict | None = None, timeout: float = 600.0):
        return _http(self.url + path, payload if payload is not None else {}, timeout)

    def get(self, path: str, timeout: float = 60.0):
        return _http(self.url + path, None, timeout)

    def generate(self, *, input_ids=None, text=None, max_new_tokens: int = 16, **extra) -> dict:
        """Greedy /generate; raises ServerError on a non-200 answer."""
        body = {"sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                    "ignore_eos": True}, **extra}
        body["input_ids" if input_ids is not None else "text"] = (
            input_ids if input_ids is not None else text)
        status, out = self.post("/generate", body)
        if status != 200:
            raise ServerError(f"/generate -> {status}: {out}")
        return out

    def generate_concurrent(self, prompts: list[list[int]], max_new_tokens: int = 16) -> list:
        """Greedy output_ids of every prompt, all requests in flight at once (so the server
        batches them); a failed request raises here."""
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max(1, len(prompts))) as ex:
            return list(ex.map(lambda p: self.generate(input_ids=p, max_new_tokens=max_new_tokens)
                               ["output_ids"], prompts))

    def _stream_chunks(self, input_ids, max_new_tokens: int, timeout: float, sampling: dict):
        """(host seconds, chunk) for every chunk of a streaming greedy /generate (ignore_eos)."""
        params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True,
                  **sampling}
        body = json.dumps({"input_ids": input_ids, "sampling_params": params,
                           "stream": True}).encode()
        req = urllib.request.Request(self.url + "/generate", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ServerError(f"/generate stream error: {chunk['error']}")
                yield time.perf_counter(), chunk

    @staticmethod
    def _add_chunk(out: dict, t: float, chunk: dict) -> None:
        out["meta_info"] = chunk.get("meta_info", {})
        out["output_ids"] = chunk.get("output_ids", [])
        out["arrivals"].append((t, int(out["meta_info"].get("completion_tokens", 0))))

    def generate_stream(self, *, input_ids, max_new_tokens: int, timeout: float = 1800.0,
                        **sampling) -> dict:
        """Streaming greedy /generate (ignore_eos). Returns {"arrivals": [(host seconds,
        completion tokens so far)] one per streamed chunk, "meta_info": the last chunk's,
        "output_ids": all ids}. Chunk arrival times give decode time per token without the
        prefill (what SGLang's bench_serving calls TPOT)."""
        out = {"arrivals": [], "meta_info": {}, "output_ids": []}
        for t, chunk in self._stream_chunks(input_ids, max_new_tokens, timeout, sampling):
            self._add_chunk(out, t, chunk)
        return out

    def generate_stream_batch(self, *, input_ids: list[list[int]], max_new_tokens: int,
                              timeout: float = 1800.0, **sampling) -> list[dict]:
        """generate_stream for B prompts in ONE /generate request (SGLang streams every
        request's chunks tagged with its index): the requests reach the scheduler together,
        where B separate HTTP requests of long prompts arrive up to a second apart (request
        parsing), longer than a fast speculative decode of 128 tokens. One dict per prompt."""
        outs = [{"arrivals": [], "meta_info": {}, "output_ids": []} for _ in input_ids]
        for t, chunk in self._stream_chunks(input_ids, max_new_tokens, timeout, sampling):
            self._add_chunk(outs[int(chunk.get("index", 0))], t, chunk)
        return outs

    def wait_healthy(self, timeout: float = 600.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if not self.alive():
                raise ServerError(f"server on port {self.port} exited:\n{self.log_tail()}")
            try:
                status, _ = self.get("/health_generate", timeout=30)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise ServerError(f"server on port {self.port} not healthy after {timeout}s:\n"
                          f"{self.log_tail()}")

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)     # the group this launcher created
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def server_command(model: str, port: int, args: list[str], *, cpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
           "--port", str(port), "--host", "127.0.0.1"]
    if cpu:
        cmd += ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "8192"]
    return cmd + list(args)


def _die_with_parent() -> None:
    """preexec_fn: the launcher gets SIGKILL when the process that started it dies (Linux).

    A test run killed by a timeout never reaches `Server.stop()`; without this its servers
    lived on (three orphaned schedulers held ~70% of a core each for an hour). SGLang's own
    children already die with the launcher (`kill_itself_when_parent_died`)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG


def start_server(model: str, port: int, args: list[str] = (), *, cpu: bool = True,
                 env: dict | None = None, log_path: str | Path | None = None,
                 cwd: str | None = None) -> Server:
    """Launch `python -m sglang.launch_server` in its own process group (no wait)."""
    full_env = dict(os.environ)
    if cpu:
        full_env["SGLANG_PLATFORM"] = PLATFORM_NAME
        full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    log_path = Path(log_path or f"/tmp/specsa_sglang_{port}.log")
    log = open(log_path, "w")
    # cwd must not hold a folder named `specsa` (a namespace package would shadow the plugin)
    # The death signal follows the thread that forked, so only tie the server to a main thread.
    tie = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
    proc = subprocess.Popen(server_command(model, port, list(args), cpu=cpu), env=full_env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=cwd or "/tmp", preexec_fn=_die_with_parent if tie else None)
    return Server(proc, port, log_path)


@contextmanager
def launch_server(model: str, port: int, args: list[str] = (), *, cpu: bool = True,
                  env: dict | None = None, log_path: str | Path | None = None,
                  timeout: float = 600.0):
    srv = start_server(model, port, args, cpu=cpu, env=env, log_path=log_path)
    try:
        srv.wait_healthy(timeout)
        yield srv
    finally:
        srv.stop()
