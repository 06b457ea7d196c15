"""The exam: subjects, questions and their CSV files (CMMLU and C-Eval layouts), or the hub datasets.

The DevOps exam is six subjects, 574 scored questions (../shared/notes/eval-protocol.md):

    CMMLU  {dev,test}/<subject>.csv           header `,Question,A,B,C,D,Answer`
    C-Eval {dev,val}/<subject>_{dev,val}.csv  header `id,question,A,B,C,D,answer[,explanation]`

and codefuse-devops-eval's own layout (its 53 subjects; `devops-model data exam` writes it too):

    DevOps-Eval [zh|en/]{dev,test}/<Subject>.csv  header `id,question,A,B,C,D,answer[,explanation]`
                categroy_mapping.json (sic; optional, beside the split folders, one up, or in resources/):
                {"<Subject>.csv": [english name, chinese name, {"dev": 5, "test": n}, "<Subject>.csv"]}

Cells are kept exactly as shipped (trailing spaces, CJK radical code points, embedded newlines): any
normalisation changes tokens and therefore scores. Every problem names file:line and how to fix it.
No torch import here.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from devops_cli.errors import DevopsError, did_you_mean, first_line

LETTERS = ("A", "B", "C", "D")

# name -> (layout, Chinese name) for the six subjects of the published DevOps exam, in its order
DEVOPS_EXAM = {
    "computer_science": ("cmmlu", "计算机科学"),
    "computer_security": ("cmmlu", "计算机安全"),
    "machine_learning": ("cmmlu", "机器学习"),
    "college_programming": ("ceval", "大学编程"),
    "computer_architecture": ("ceval", "计算机组成"),
    "computer_network": ("ceval", "计算机网络"),
}
# Chinese names of the bundled sample exam's subjects (devops_cli/assets/exam), for the headers
ZH_NAMES = {"devops_practice": "开发运维实践", "linux_operations": "Linux运维"}
HUB = {"cmmlu": "haonan-li/cmmlu", "ceval": "ceval/ceval-exam"}
SCORED_SPLIT = {"cmmlu": "test", "ceval": "val", "devopseval": "test"}
MAPPING = "categroy_mapping.json"  # codefuse-devops-eval's spelling
CMMLU_HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]
CEVAL_HEADERS = (["id", "question", "A", "B", "C", "D", "answer"],
                 ["id", "question", "A", "B", "C", "D", "answer", "explanation"])  # fmt: skip


@dataclass
class Question:
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of A-D (the cell after .strip().upper(), as the devops-eval harness reads it)
    where: str = ""  # file:line, for messages


@dataclass
class Subject:
    name: str
    layout: str  # cmmlu | ceval
    zh: str  # Chinese name, for the CMMLU / C-Eval / lm-eval headers
    dev: list[Question] = field(default_factory=list)
    test: list[Question] = field(default_factory=list)
    dev_file: str = ""
    test_file: str = ""


def _header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []  # read_csv names the problem with its file:line


def _files(root: Path) -> dict[str, tuple[str, Path, Path]]:
    """{subject: (layout, dev csv, scored csv)} found directly in root (one layout per root)."""
    found = {}
    for path in sorted((root / "test").glob("*.csv")):  # CMMLU, or DevOps-Eval (told apart by the header)
        layout = "devopseval" if _header(path)[:2] == ["id", "question"] else "cmmlu"
        found[path.stem] = (layout, root / "dev" / path.name, path)
    for path in sorted((root / "val").glob("*_val.csv")):  # C-Eval
        name = path.name[: -len("_val.csv")]
        found.setdefault(name, ("ceval", root / "dev" / f"{name}_dev.csv", path))
    return found


def discover(data_dir: Path) -> dict[str, tuple[str, Path, Path]]:
    """Subjects of a data dir in either layout, at its top or one folder down (cmmlu/, ceval/, ...)."""
    if not data_dir.is_dir():
        raise DevopsError(f"--data-dir '{data_dir}' is not a directory",
                          hint="point it at a folder holding cmmlu/{dev,test}/*.csv or ceval/{dev,val}/*.csv")
    found = _files(data_dir)
    for sub in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for name, entry in _files(sub).items():
            found.setdefault(name, entry)
    if not found:
        raise DevopsError(f"--data-dir '{data_dir}' holds no exam CSVs",
                          hint="expected CMMLU {dev,test}/<subject>.csv, C-Eval {dev,val}/<subject>_{dev,val}.csv "
                               "or DevOps-Eval {dev,test}/<Subject>.csv")
    return found


def category_names(data_dir: Path, test_file: Path) -> tuple[str, str] | None:
    """(english, chinese) names of a DevOps-Eval subject file from its categroy_mapping.json, if one is
    beside the split folders, one folder up (the zh/ en/ parent) or in resources/ there."""
    split_root = test_file.parent.parent
    for folder in (split_root, split_root.parent, data_dir, split_root.parent / "resources", data_dir / "resources"):
        path = folder / MAPPING
        if path.is_file():
            try:
                mapping = json.loads(path.read_text(encoding="utf-8-sig"))
                entry = mapping[test_file.name]
                return str(entry[0]), str(entry[1])
            except KeyError:
                return None
            except (ValueError, TypeError, IndexError, UnicodeDecodeError) as e:
                raise DevopsError(f"not codefuse-devops-eval's mapping ({first_line(e)})", str(path),
                                  'expected {"<Subject>.csv": [english, chinese, {"dev": 5, "test": n}, file]}') from None
    return None


def select(names: str | None, available: list[str]) -> list[str]:
    """--subjects: None (the six DevOps exam subjects), 'all' (every subject found) or 'a,b'."""
    if names is None or not names.strip():
        return list(DEVOPS_EXAM)
    if names.strip() == "all":
        return list(available)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for n in chosen:
        if n not in available:
            hint = did_you_mean(n, available) or f"choose from {', '.join(available)} or 'all'"
            raise DevopsError(f"--subjects: no subject '{n}'", hint=hint)
    return list(dict.fromkeys(chosen))


def read_csv(path: Path, layout: str, split: str) -> list[Question]:
    """Rows of one exam CSV, checked: header, column count, answer letter. Errors name file:line."""
    if not path.is_file():
        raise DevopsError(f"exam file not found: {path}",
                          hint=f"a {layout} subject needs {'dev/ and val/' if layout == 'ceval' else 'dev/ and test/'} files")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DevopsError(f"not UTF-8 (byte {e.start})", str(path), "save the file as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))  # as open(newline=""): cells keep their CR/LF
    rows: list[tuple[int, list[str]]] = []
    try:
        line = 1
        for row in reader:
            rows.append((line, row))
            line = reader.line_num + 1
    except csv.Error as e:
        raise DevopsError(f"bad CSV: {e}", f"{path}:{reader.line_num}", "fix the quoting of that row") from None
    if not rows:
        raise DevopsError("the file is empty", str(path), "it needs a header line and at least one question")
    header_line, header = rows[0]
    expected = [CMMLU_HEADER] if layout == "cmmlu" else list(CEVAL_HEADERS)  # DevOps-Eval: C-Eval's columns
    if header not in expected:
        want = " or ".join(",".join(h) for h in expected)
        raise DevopsError(f"wrong header {','.join(header)!r}", f"{path}:{header_line}", f"a {layout} file starts with {want}")
    questions = []
    answer_col = header.index("Answer" if layout == "cmmlu" else "answer")
    for line, row in rows[1:]:
        if not row:
            continue  # a blank line
        where = f"{path}:{line}"
        if len(row) != len(header):
            raise DevopsError(f"row has {len(row)} columns, the header {len(header)} ({','.join(header)})", where,
                              "quote cells that contain commas or newlines")
        answer = row[answer_col].strip().upper()
        if answer not in LETTERS:
            raise DevopsError(f"answer {row[answer_col]!r} is not one of A, B, C, D", where, "fix the answer cell")
        questions.append(Question(id=row[0], question=row[1], options=tuple(row[2:6]), answer=answer, where=where))
    if not questions:
        raise DevopsError(f"no questions in the {split} file", str(path), "add rows below the header")
    return questions


def load_local(data_dir: Path, subjects: str | None, shots: int) -> list[Subject]:
    found = discover(data_dir)
    chosen = select(subjects, list(found))
    out = []
    for name in chosen:
        if name not in found:
            raise DevopsError(f"subject '{name}' of the DevOps exam is not in '{data_dir}'",
                              hint="pass --subjects all (every subject found) or --subjects a,b")
        layout, dev_file, test_file = found[name]
        zh = DEVOPS_EXAM[name][1] if name in DEVOPS_EXAM else ZH_NAMES.get(name, name)
        if layout == "devopseval" and (names := category_names(data_dir, test_file)):
            zh = names[1]
        s = Subject(name, layout, zh, dev_file=str(dev_file), test_file=str(test_file))
        s.test = read_csv(test_file, layout, SCORED_SPLIT[layout])
        s.dev = read_csv(dev_file, layout, "dev") if shots else []
        _check_shots(s, shots)
        out.append(s)
    return out


def _check_shots(s: Subject, shots: int) -> None:
    if shots > len(s.dev):
        raise DevopsError(f"--shots {shots}, but {s.dev_file} has {len(s.dev)} exemplar rows",
                          hint=f"use --shots {len(s.dev)} or fewer")


def load_hub(subjects: str | None, shots: int) -> list[Subject]:
    """The six subjects from the hub datasets of the notes (haonan-li/cmmlu, ceval/ceval-exam)."""
    chosen = select(subjects if subjects != "all" else None, list(DEVOPS_EXAM))
    from datasets import load_dataset

    out = []
    for name in chosen:
        layout, zh = DEVOPS_EXAM[name]
        s = Subject(name, layout, zh, dev_file=f"{HUB[layout]}:{name}:dev",
                    test_file=f"{HUB[layout]}:{name}:{SCORED_SPLIT[layout]}")
        for split, target in (("dev", s.dev), (SCORED_SPLIT[layout], s.test)):
            if split == "dev" and not shots:
                continue
            try:
                rows = load_dataset(HUB[layout], name, split=split)
            except Exception as e:  # network, auth, missing config: one line, not a traceback
                raise DevopsError(f"cannot load {HUB[layout]} ({name}, {split}): {first_line(e)}",
                                  hint="pass --data-dir with the CSV files (see ../shared/data/devops-exam)") from None
            q_col, a_col = ("Question", "Answer") if layout == "cmmlu" else ("question", "answer")
            for i, r in enumerate(rows):
                where = f"{HUB[layout]}:{name}:{split}[{i}]"
                answer = str(r[a_col]).strip().upper()
                if answer not in LETTERS:
                    raise DevopsError(f"answer {r[a_col]!r} is not one of A, B, C, D", where)
                qid = str(r.get("id", r.get("", i)))
                target.append(Question(qid, r[q_col], tuple(str(r[x]) for x in LETTERS), answer, where))
        _check_shots(s, shots)
        out.append(s)
    return out
