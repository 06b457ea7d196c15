"""Grounded question–answer pairs from document chunks, written by a teacher LLM.

Per chunk: one request for questions (~1 per `chars_per_question` characters, at most `max_questions`),
then one request per question for its answer from the chunk alone. A pair is kept only when
- both replies parse as the JSON the prompt asked for ("not JSON" otherwise),
- the teacher did not say the chunk lacks the answer ("no answer in chunk"),
- the answer is grounded: at least `min_grounding` of its key terms (words of 3+ letters, numbers,
  Chinese character pairs) occur in the chunk ("not grounded"),
- it is not a duplicate or near-duplicate (MinHash over character 3-grams, Jaccard ≥ `dup_threshold`)
  of a question already kept ("duplicate").
Every rejection is counted by reason in the report; nothing is printed of the chunks themselves.
Prompts are text files (assets/prompts/*.{en,zh}.txt) a user can replace with --prompts DIR.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from devops_cli.data.chunk import Chunk
from devops_cli.data.teacher import NOT_ASKED, Teacher, parse_json
from devops_cli.errors import DevopsError

PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "prompts"
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]{2,}|\d+(?:\.\d+)*")
STOP = set("the and for with that this from are was were you your can not but has have had its into when what "
           "which who how why use used using will would should could may might also than then there their them "
           "they these those all any each more most other some such only own same very just about over after "
           "before between both does did doing done how here where while yes".split())


def language(text: str) -> str:
    letters = sum(c.isalpha() for c in text) or 1
    return "zh" if len(CJK.findall(text)) / letters > 0.2 else "en"


def terms(text: str) -> set[str]:
    """Key terms: words of 3+ characters (not stop words), numbers, and Chinese character pairs."""
    out = {w.lower().strip(".-/") for w in WORD.findall(text)} - STOP
    for run in re.findall(r"[\u3400-\u9fff\uf900-\ufaff]+", text):
        out |= {run[i:i + 2] for i in range(len(run) - 1)} or {run}
    return {t for t in out if t}


def grounding(answer: str, chunk: str) -> float:
    """The share of the answer's key terms that occur in the chunk (0 when the answer has none)."""
    want = terms(answer)
    return len(want & terms(chunk)) / len(want) if want else 0.0


def load_prompt(name: str, lang: str, prompts_dir: Path | None) -> str:
    """assets/prompts/NAME.LANG.txt, or the user's file of the same name in --prompts DIR."""
    for folder in ([prompts_dir] if prompts_dir else []) + [PROMPTS]:
        path = folder / f"{name}.{lang}.txt"
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DevopsError("not UTF-8", str(path), "save the prompt file as UTF-8") from None
    raise DevopsError(f"no prompt file {name}.{lang}.txt", "--prompts", f"copy it from {PROMPTS}")


def fill(template: str, **values) -> str:
    """{name} placeholders replaced (the templates hold JSON braces, so no str.format)."""
    for k, v in values.items():
        template = template.replace("{" + k + "}", str(v))
    return template


class NearDup:
    """Questions seen so far, for exact and near-duplicate rejection (MinHash LSH, datasketch)."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 64):
        from datasketch import MinHash, MinHashLSH

        self._minhash, self.num_perm = MinHash, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.exact: set[str] = set()
        self.n = 0

    def seen(self, text: str) -> bool:
        norm = re.sub(r"\W+", "", text.lower())
        if norm in self.exact:
            return True
        m = self._minhash(num_perm=self.num_perm, seed=1)
        for i in range(max(1, len(norm) - 2)):
            m.update(norm[i:i + 3].encode("utf-8"))
        if self.lsh.query(m):
            return True
        self.exact.add(norm)
        self.lsh.insert(str(self.n), m)
        self.n += 1
        return False


def drop_duplicates(rows: list[dict], key: str, tally: Tally) -> list[dict]:
    """Exact and near-duplicate questions dropped in the documents' order once every reply is in, so which
    copy is kept never depends on which request finished first: a rerun from the cache writes the same file."""
    dups, kept = NearDup(), []
    for r in rows:
        if dups.seen(r[key]):
            tally.reject("duplicate")
        else:
            tally.kept += 1
            kept.append(r)
    return kept


@dataclass
class Settings:
    chars_per_question: int = 240
    max_questions: int = 5
    min_grounding: float = 0.5
    dup_threshold: float = 0.7
    language: str = "auto"  # auto | en | zh
    prompts_dir: Path | None = None


@dataclass
class Tally:
    chunks: int = 0
    questions: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, why: str, n: int = 1) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + n


async def pairs_of(chunk: Chunk, teacher: Teacher, settings: Settings, tally: Tally) -> list[dict]:
    """The chunk's grounded pairs; duplicates are dropped afterwards, in the documents' order (drop_duplicates)."""
    lang = language(chunk.text) if settings.language == "auto" else settings.language
    n = max(1, min(settings.max_questions, round(len(chunk.text) / settings.chars_per_question)))
    ask = fill(load_prompt("qa_questions", lang, settings.prompts_dir), title=chunk.title, heading=chunk.heading or "-",
               text=chunk.text, n=n)
    reply = await teacher.ask([{"role": "user", "content": ask}])
    if reply.text is None:
        tally.reject(reply.error if reply.error == NOT_ASKED else "teacher failed")
        return []
    got = parse_json(reply.text)
    questions = got.get("questions") if got else None
    if not isinstance(questions, list):
        tally.reject("not JSON")
        return []
    questions = [q.strip() for q in questions if isinstance(q, str) and q.strip()][: settings.max_questions]
    tally.questions += len(questions)
    template = load_prompt("qa_answer", lang, settings.prompts_dir)

    async def answer(q: str):
        r = await teacher.ask([{"role": "user", "content": fill(template, title=chunk.title, heading=chunk.heading or "-",
                                                                  text=chunk.text, question=q)}])
        return q, r.text, "" if r.text is not None else r.error if r.error == NOT_ASKED else "teacher failed"

    out = []
    for q, text, why in await asyncio.gather(*(answer(q) for q in questions)):
        if why:
            tally.reject(why)
            continue
        got = parse_json(text)
        if got is None or "answer" not in got:
            tally.reject("not JSON")
            continue
        a = got["answer"]
        if a is None or (isinstance(a, str) and not a.strip()):
            tally.reject("no answer in chunk")
            continue
        if not isinstance(a, str):
            tally.reject("not JSON")
            continue
        if grounding(a, chunk.text) < settings.min_grounding or not terms(q) & terms(chunk.text):
            tally.reject("not grounded")
            continue
        out.append({"instruction": q, "input": "", "output": a.strip(), "source": chunk.source,
                    "section": chunk.heading})
    return out
