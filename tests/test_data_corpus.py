"""`data corpus` on real documentation nobody here wrote (Debian's doc packages: HTML, Markdown, text,
.gz, PDF, English and Chinese), with secrets of every kind and near-duplicates planted into copies:
every planted secret is gone from every output file, >= 95% of the planted near-duplicates are
removed, hand-checked look-alike pages are all kept, and `pt` trains on the result.

Debian's packages come from `make docs-corpus` (apt); without them these tests skip with a reason."""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

PG = Path("/usr/share/doc/postgresql-doc-15/html")
DOCKER = Path("/usr/share/doc/docker-doc/reference/commandline")
REF = Path("/usr/share/debian-reference")
NGINX = Path("/usr/share/doc/nginx")
NEEDED = [PG / "sql-dropview.html", DOCKER, REF / "ch05.zh-cn.html", REF / "debian-reference.en.pdf", NGINX]
pytestmark = pytest.mark.skipif(not all(p.exists() for p in NEEDED),
                                reason="Debian doc packages missing: run `make docs-corpus` (apt-get install "
                                       "debian-reference-en debian-reference-zh-cn postgresql-doc-15 nginx-doc docker-doc)")

# kind -> secret values planted (each must vanish from the output); the config line around each is kept
SECRETS = {
    "aws_access_key": ["AKIAQ7ZXW3ERTY5UIOP2"],
    "aws_secret_key": ["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"],
    "github_token": ["ghp_R8s2Kq9Lm4Np7Tv1Xw3Yz6Ab0Cd5Ef8Gh2Jk", "github_pat_11ABCDEFG0" + "x7Yq" * 20],
    "slack_token": ["xoxb-2048-4096-SaltyMangoTangoWhiskey42"],
    "slack_webhook": ["T0ABCDEF1/B0GHIJKL2/qwertyuiopasdfghjklzxcv"],
    "jwt": ["eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJvcHMtYm90Iiwicm9sZSI6ImFkbWluIn0.c2lnbmF0dXJlX3BsYW50ZWQ"],
    "bearer": ["Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4OQ"],
    "private_key": ["b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW",
                    "QyNTUxOQAAACDPlantedKeyMaterialForTestOnly0123456789abcdefABCDEF"],
    "yaml_password": ["Tr0ub4dor&3-planted"],
    "ini_password": ["CorrectHorseBatteryStaple-77"],
    "env_password": ["pl4nted-env-s3cret"],
    "json_api_key": ["k-9f8e7d6c5b4a39281716"],
    "url_password": ["Sup3rS3cretDbPass"],
    "email": ["maria.ops@acme-internal.io", "wang.yunwei@acme-internal.cn"],
    "stripe": ["sk_live_4eC39HqLyjWDarjtT1zdp7dc"],
    "google_api_key": ["AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"],
    "zh_password": ["数据库Pass-2026-planted"],
}
SNIPPETS = [  # (file kind, text): the secrets above in the syntaxes a DevOps document holds them
    ("ini", f"[default]\naws_access_key_id = {SECRETS['aws_access_key'][0]}\n"
            f"aws_secret_access_key = {SECRETS['aws_secret_key'][0]}\n"),
    ("sh", f"export GITHUB_TOKEN={SECRETS['github_token'][0]}\ngit clone https://oauth2:{SECRETS['github_token'][1]}"
           f"@github.com/acme/infra.git\n"),
    ("yaml", f"slack:\n  token: {SECRETS['slack_token'][0]}\n  webhook: https://hooks.slack.com/services/"
             f"{SECRETS['slack_webhook'][0]}\n"),
    ("sh", f"curl -H \"Authorization: Bearer {SECRETS['bearer'][0]}\" https://api.acme.io/v1/deploy\n"
           f"curl -H 'X-Session: {SECRETS['jwt'][0]}' https://api.acme.io/v1/me\n"),
    ("key", "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(SECRETS["private_key"]) + "\n-----END OPENSSH PRIVATE KEY-----\n"),
    ("yaml", f"database:\n  host: db01\n  password: {SECRETS['yaml_password'][0]}\n"),
    ("ini", f"[mysql]\nuser = deploy\ndb_password = {SECRETS['ini_password'][0]}\n"),
    ("env", f"DATABASE_PASSWORD={SECRETS['env_password'][0]}\nSTRIPE_KEY={SECRETS['stripe'][0]}\n"),
    ("json", f'{{"service": "billing", "api_key": "{SECRETS["json_api_key"][0]}", "maps": "{SECRETS["google_api_key"][0]}"}}\n'),
    ("url", f"DATABASE_URL=postgresql://deploy:{SECRETS['url_password'][0]}@db01.internal.acme:5432/prod\n"),
    ("text", f"On-call: {SECRETS['email'][0]}, backup {SECRETS['email'][1]}.\n"),
]
LOOK_ALIKES = [  # distinct pages that are the most alike in these docs (estimated Jaccard 0.3-0.41), hand-checked
    ("config_ls.md.gz", "secret_ls.md.gz"), ("config_rm.md", "secret_rm.md"),
    ("sql-droptsparser.html", "sql-droptstemplate.html"), ("sql-dropmaterializedview.html", "sql-dropview.html"),
    ("sql-dropforeigndatawrapper.html", "sql-dropserver.html"),
]


def _perturb(text: str, rng: random.Random) -> str:
    """A near-duplicate: about one word in 150 changed, and one sentence added."""
    words = list(re.finditer(r"(?<=[ >])[a-z]{4,}(?=[ ,.])", text))
    for m in sorted(rng.sample(words, max(1, len(words) // 150)), key=lambda m: -m.start()):
        text = text[: m.start()] + m.group()[::-1] + text[m.end() :]
    return text.replace("</body>", "<p>Reviewed by the platform team before the 2026 upgrade.</p></body>") \
        if "</body>" in text else text + "\nReviewed by the platform team before the 2026 upgrade.\n"


def _plant(html_or_md: str, snippet: str, kind: str) -> str:
    if "</body>" in html_or_md:
        block = f"<h2>Deploy settings</h2><p>Use these settings:</p><pre>{snippet}</pre>"
        return html_or_md.replace("</body>", block + "</body>")
    return html_or_md + f"\n\n## Deploy settings\n\n```{kind}\n{snippet}```\n"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A copy of the docs with secrets and duplicates planted: (docs dir, planted near-dup sources, exact copies)."""
    rng = random.Random(0)
    docs = tmp_path_factory.mktemp("debian") / "docs"
    (docs / "pg").mkdir(parents=True)
    pages = sorted(PG.glob("sql-drop*.html")) + sorted(PG.glob("app-*.html"))[:30] + sorted(PG.glob("runtime-config-*.html"))
    for p in pages:
        shutil.copy(p, docs / "pg" / p.name)
    shutil.copytree(DOCKER, docs / "docker", ignore=lambda d, names: [n for n in names if not n.endswith((".md", ".md.gz"))])
    (docs / "ref").mkdir()
    for name in ("ch05.en.html", "ch05.zh-cn.html", "debian-reference.en.pdf"):
        shutil.copy(REF / name, docs / "ref" / name)
    shutil.copytree(NGINX / "examples", docs / "nginx")
    # secrets: into copies of real pages, one snippet each, in HTML <pre>, Markdown code, text and .gz
    hosts = sorted((docs / "pg").glob("app-*.html"))[:6] + sorted((docs / "docker").glob("*.md"))[:5]
    for (kind, snippet), host in zip(SNIPPETS, hosts):
        host.write_text(_plant(host.read_text(encoding="utf-8"), snippet, kind), encoding="utf-8")
    zh = docs / "ref" / "ch05.zh-cn.html"
    zh.write_text(zh.read_text(encoding="utf-8").replace(
        "</body>", f"<pre>数据库配置\npassword: {SECRETS['zh_password'][0]}\n</pre></body>"), encoding="utf-8")
    with gzip.open(docs / "runbook.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Runbook: rotate the credentials below after an incident.\n\n" + "".join(s for _, s in SNIPPETS))
    # near duplicates: the larger pages again, slightly edited, in a folder read after the originals
    near = []
    (docs / "zz-near").mkdir()
    big = [p for p in sorted((docs / "pg").glob("*.html")) + sorted((docs / "docker").glob("*.md"))
           if p.stat().st_size > 12_000 and p not in hosts][:30]
    for p in big:
        copy = docs / "zz-near" / p.name
        copy.write_text(_perturb(p.read_text(encoding="utf-8"), rng), encoding="utf-8")
        near.append(str(copy))
    exact = []
    for p in sorted((docs / "pg").glob("runtime-config-*.html"))[:3]:
        (docs / "zz-exact").mkdir(exist_ok=True)
        shutil.copy(p, docs / "zz-exact" / p.name)
        exact.append(str(docs / "zz-exact" / p.name))
    return docs, near, exact


@pytest.fixture(scope="module")
def corpus(planted):
    from devops_cli.cli import main

    docs, _, _ = planted
    out = docs.parent / "out"
    with pytest.raises(SystemExit) as e:
        main(["data", "corpus", str(docs), "--output", str(out), "--name", "debian"])
    assert e.value.code == 0
    report = json.loads((out / "debian.report.json").read_text())
    rows = [json.loads(line) for line in (out / "debian.jsonl").read_text(encoding="utf-8").splitlines()]
    return out, report, rows


def test_every_planted_secret_is_gone_from_every_output_file(corpus):
    out, report, rows = corpus
    blobs = {p.name: p.read_text(encoding="utf-8") for p in out.iterdir()}
    assert set(blobs) == {"debian.jsonl", "debian.report.json", "dataset_info.json"}  # no work files left
    for kind, values in SECRETS.items():
        for value in values:
            for name, blob in blobs.items():
                for form in {value, json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1]}:
                    assert form not in blob, f"{kind} secret found in {name}"
    text = "\n".join(r["text"] for r in rows)
    # the typed placeholders stand where the secrets were, and the report counts them by kind
    for kind in ("aws_access_key", "github_token", "slack_token", "json_web_token", "bearer_token", "private_key",
                 "password", "url_credentials", "email", "stripe_access_key", "google_api_key"):
        assert f"<SECRET:{kind}>" in text, kind
        assert report["secrets"].get(kind, 0) >= 1, kind
    assert "password: <SECRET:password>" in text and "数据库配置" in text  # the line around it stays


def test_planted_near_duplicates_are_removed_and_look_alikes_kept(planted, corpus):
    _, near, exact = planted
    _, report, rows = corpus
    kept = {r["source"] for r in rows}
    removed = {x["source"] for c in report["duplicates"]["near"] for x in c["removed"]}
    found = [s for s in near if s in removed and s not in kept]
    assert len(near) >= 20 and len(found) >= 0.95 * len(near), (len(found), len(near), sorted(set(near) - set(found)))
    for cluster in report["duplicates"]["near"]:  # the original (or its exact copy) is the one kept: read first
        for x in cluster["removed"]:
            if x["source"] in near:
                assert Path(x["source"]).name == Path(cluster["kept"]).name and x["jaccard"] >= 0.8
    exact_removed = {s for c in report["duplicates"]["exact"] for s in c["removed"]}
    assert set(exact) <= exact_removed and report["exact_duplicates"] >= len(exact)
    names = {Path(s).name for s in kept}
    for a, b in LOOK_ALIKES:  # no false merge of distinct pages
        assert a in names and b in names, (a, b)
    assert not [s for s in removed if "zz-near" not in s and Path(s).name in {n for pair in LOOK_ALIKES for n in pair}]


def test_formats_languages_and_the_report(corpus):
    out, report, rows = corpus
    by_name = {Path(r["source"]).name: r for r in rows}
    zh = by_name["ch05.zh-cn.html"]
    assert zh["title"].startswith("第 5 章") and "网络" in zh["text"] and zh["text"].startswith("# 第 5 章")
    assert "```" in by_name["sql-dropview.html"]["text"] and "DROP VIEW" in by_name["sql-dropview.html"]["text"]
    assert "Prev" not in by_name["sql-dropview.html"]["text"].split("\n")[0]  # the navigation bar is not text
    assert any(n.endswith(".pdf") for n in by_name) and any(n.endswith(".md.gz") for n in by_name)
    assert report["documents"] == len(rows) and report["files_read"] > 150
    assert report["skipped"] == {} or all(v["count"] for v in report["skipped"].values())
    registry = json.loads((out / "dataset_info.json").read_text())
    assert registry["debian"]["file_name"] == "debian.jsonl" and registry["debian"]["stage"] == "pt"
    assert set(rows[0]) == {"text", "source", "title"}


def test_rerun_needs_overwrite_and_is_idempotent(planted, corpus, capsys):
    from devops_cli.cli import main

    docs, _, _ = planted
    out, _, _ = corpus
    before = (out / "debian.jsonl").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["data", "corpus", str(docs), "--output", str(out), "--name", "debian"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err
    with pytest.raises(SystemExit) as e:
        main(["data", "corpus", str(docs), "--output", str(out), "--name", "debian", "--overwrite"])
    assert e.value.code == 0 and (out / "debian.jsonl").read_bytes() == before


@pytest.mark.slow
def test_pt_trains_on_the_corpus(corpus, tiny_model, tmp_path):
    out, _, _ = corpus
    r = run_cli("pt", str(ROOT / "configs" / "tiny-pt.yaml"), f"model_name_or_path={tiny_model}", f"dataset_dir={out}",
                "dataset=debian", f"output_dir={tmp_path / 'pt'}", "max_steps=3", "val_size=0", "eval_steps=null",
                "nproc_per_node=1", "report_to=none", "plot_loss=false", "per_device_train_batch_size=2",
                "max_source_length=128", "save_steps=1000")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "pt" / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["data"]["blocks"] > 100
