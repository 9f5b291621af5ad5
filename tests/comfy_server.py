"""Start and drive a real ComfyUI server for the server and browser tests.

``ComfyServer`` runs ``$COMFYUI_PATH/main.py --cpu`` (through ``scripts/comfy_env.py``) on a
free port of 127.0.0.1 with every working folder (models, custom_nodes, input, output, temp, user) in a
temporary base directory and an in-memory database; custom node packs are symlinked into that
``custom_nodes``.  Every wait is bounded; ``stop()`` ends the server's own process group only.

Nothing here imports ComfyUI: the server runs in its own process.  ``SKIP_REASON`` and ``comfy_path``
are ``scripts/comfy_env.py``'s.  The websocket helpers use aiohttp,
which ComfyUI's requirements install (it is imported only when a websocket is opened).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.comfy_env import ROOT, SKIP_REASON, comfy_path

TESTS = ROOT / "tests"
LAUNCHER = ROOT / "scripts" / "comfy_env.py"  # python LAUNCHER ARGS = python $COMFYUI_PATH/main.py ARGS (+ workaround)
TINY_PACK = TESTS / "server" / "tiny_models_pack"
PACK_DIR_NAME = "ComfyUI-EcoDiff"  # the folder name ComfyUI sees (web files are served under it)
TINY_PACK_DIR_NAME = "ecodiff_tiny_models"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """One ComfyUI server process with its own temporary folders."""

    def __init__(self, base: Path, packs: dict[str, Path] | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.base = Path(base)
        self.packs = dict(packs if packs is not None else {PACK_DIR_NAME: ROOT, TINY_PACK_DIR_NAME: TINY_PACK})
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.url = f"http://{HOST}:{self.port}"

    # ---------------------------------------------------------------------------- folders
    def dir(self, name: str) -> Path:
        return self.base / name

    @property
    def models(self) -> Path:
        return self.base / "models"

    def _prepare(self) -> None:
        for name in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base / name).mkdir(parents=True, exist_ok=True)
        for name, target in self.packs.items():
            link = self.base / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(Path(target).resolve(), target_is_directory=True)

    # ---------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 180.0) -> ComfyServer:
        root = comfy_path()
        if root is None:
            raise ServerError(SKIP_REASON)
        self._prepare()
        cmd = [sys.executable, str(LAUNCHER), "--cpu", "--listen", HOST, "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base),
               "--output-directory", str(self.dir("output")), "--input-directory", str(self.dir("input")),
               "--temp-directory", str(self.dir("temp")), "--user-directory", str(self.dir("user")),
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = dict(os.environ, COMFYUI_PATH=root, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   TQDM_DISABLE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(cmd, cwd=str(self.base), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while starting:\n"
                                  f"{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (OSError, ServerError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group this object started (start_new_session)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=timeout)
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self) -> ComfyServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # ---------------------------------------------------------------------------- HTTP
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        status, raw = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ServerError(f"GET {path} answered {status}: {raw[:500]!r}")
        return json.loads(raw)

    def post_json(self, path: str, body: Any, timeout: float = 30.0) -> tuple[int, Any]:
        status, raw = self.request("POST", path, body, timeout=timeout)
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=60)

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; the prompt id, or ServerError with ComfyUI's validation answer."""
        status, answer = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if status != 200:
            raise ServerError(f"POST /prompt answered {status}: {json.dumps(answer)[:3000]}")
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait_history(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(poll)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue a prompt and wait for its history entry (no websocket)."""
        return self.wait_history(self.queue(prompt), timeout)

    # ---------------------------------------------------------------------------- websocket
    def run_with_ws(self, prompt: dict, timeout: float = 300.0,
                    on_message: Callable[[WsRun, dict], Any] | None = None) -> WsRun:
        """Queue ``prompt`` with a websocket open and collect every JSON message until the prompt ends
        (``executing`` with node None, ``execution_error`` or ``execution_interrupted``).
        ``on_message(run, message)`` may be a coroutine function; it may call ``run.interrupt()``."""
        import asyncio

        return asyncio.run(self._run_with_ws(prompt, timeout, on_message))

    async def _run_with_ws(self, prompt: dict, timeout: float, on_message) -> WsRun:
        import asyncio
        import inspect

        import aiohttp

        client_id = uuid.uuid4().hex
        run = WsRun(self, client_id)
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"{self.url}/ws?clientId={client_id}", heartbeat=30) as ws:
            run.prompt_id = self.queue(prompt, client_id)
            while not run.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerError(f"no end of prompt {run.prompt_id} within {timeout:.0f} s; last messages: "
                                      f"{[m.get('type') for m in run.messages[-10:]]}\n{self.log_tail()}")
                try:
                    msg = await ws.receive(timeout=min(left, 5.0))
                except asyncio.TimeoutError:
                    if self.proc is not None and self.proc.poll() is not None:
                        raise ServerError(f"ComfyUI died:\n{self.log_tail()}") from None
                    continue
                if msg.type == aiohttp.WSMsgType.BINARY:
                    run.binary += 1
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise ServerError(f"websocket closed ({msg.type}) before prompt {run.prompt_id} ended")
                data = json.loads(msg.data)
                run.messages.append(data)
                run._track(data)
                if on_message is not None:
                    result = on_message(run, data)
                    if inspect.isawaitable(result):
                        await result
        run.history = self.wait_history(run.prompt_id, timeout=max(10.0, deadline - time.monotonic()))
        return run


@dataclass
class WsRun:
    """What one prompt sent over the websocket (JSON messages in order) and its history entry."""

    server: ComfyServer
    client_id: str
    prompt_id: str | None = None
    messages: list[dict] = field(default_factory=list)
    binary: int = 0
    done: bool = False
    end: str | None = None  # "success" | "execution_error" | "execution_interrupted"
    history: dict | None = None

    def _track(self, data: dict) -> None:
        kind, body = data.get("type"), data.get("data") or {}
        if body.get("prompt_id") not in (None, self.prompt_id):
            return
        if kind in ("execution_error", "execution_interrupted"):
            self.done, self.end = True, kind
        elif kind == "executing" and body.get("node") is None and body.get("prompt_id") == self.prompt_id:
            self.done, self.end = True, self.end or "success"

    def of_type(self, kind: str) -> list[dict]:
        return [m.get("data") or {} for m in self.messages if m.get("type") == kind]

    def interrupt(self, prompt_id: str | None = None) -> int:
        status, _ = self.server.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        return status


# ------------------------------------------------------------------------------------------------
# API-format graphs on the test-only tiny models (tests/server/tiny_models_pack)
# ------------------------------------------------------------------------------------------------
def learn_inputs(**overrides) -> dict:
    inputs = {"prompts": "a red fox in the snow\na lighthouse in a storm\na bowl of ramen",
              "negative_prompt": "blurry", "max_prompts": 2, "width": 64, "height": 64, "steps": 2, "cfg": 2.0,
              "sampler_name": "euler", "scheduler": "normal", "seed": 0, "epochs": 2, "beta": 0.5,
              "run_name": "e2e", "resume": False}
    inputs.update(overrides)
    return inputs


def learn_prune_compare_graph(arch: str = "sdxl", run_name: str = "e2e", model_seed: int = 0, **learn) -> dict:
    """Tiny checkpoint -> Learn (+ Learn Settings: one prompt per optimiser step) -> Apply -> KSampler x2
    (same seed) -> VAE decode x2 -> Compare (+ report).  A distinct ``model_seed`` gives a freshly built
    model (the test pack caches models per arch and seed)."""
    latent = "EmptySD3LatentImage" if arch in ("flux", "sd3") else "EmptyLatentImage"
    ks = {"seed": 7, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
          "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["6", 0], "denoise": 1.0}
    return {
        "1": {"class_type": "EcoDiffTinyCheckpointLoader", "inputs": {"arch": arch, "seed": model_seed}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EcoDiffLearnMask",
              "inputs": dict(learn_inputs(run_name=run_name, **learn), model=["1", 0], clip=["1", 1],
                             settings=["13", 0])},
        "13": {"class_type": "EcoDiffLearnSettings", "inputs": {"accumulate": 1}},
        "5": {"class_type": "EcoDiffApplyMask", "inputs": {"model": ["1", 0], "mask": ["4", 0], "target": "params",
                                                           "sparsity": 0.2, "keep_ratios": "head=0.8",
                                                           "mode": "prune"}},
        "6": {"class_type": latent, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": dict(ks, model=["1", 0])},
        "8": {"class_type": "KSampler", "inputs": dict(ks, model=["5", 0])},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "11": {"class_type": "EcoDiffCompare", "inputs": {"image_a": ["9", 0], "image_b": ["10", 0],
                                                          "label_a": "original", "label_b": "pruned"}},
        "12": {"class_type": "EcoDiffPruningReport", "inputs": {"report": ["5", 1]}},
    }
