"""The tokenizer rebuilt from the real qwen.tiktoken encodes exactly like tiktoken with Qwen v1's
regex, NFC and special tokens (QWenTokenizer.tokenize), on a >= 50 KB mixed corpus written here."""

from __future__ import annotations

import random
import unicodedata

import pytest
from test_convert_kit import SHARED_V1, need_shared

ZH = [
    "在 Kubernetes 集群中，Pod 处于 CrashLoopBackOff 状态通常意味着容器启动后立即退出。",
    "请先用 kubectl describe pod 查看事件，再用 kubectl logs --previous 查看上一次崩溃的日志。",
    "磁盘使用率达到 100% 时，应优先清理 /var/log 下的旧日志，并检查 logrotate 的配置是否生效。",
    "灰度发布（金丝雀发布）先将 5% 的流量切到新版本，观察错误率与延迟后再逐步扩大。",
    "Prometheus 的告警规则写在 rules.yml 中，Alertmanager 负责分组、抑制和路由告警。",
    "数据库主从延迟过大时，检查从库的 IO 线程与 SQL 线程状态：SHOW SLAVE STATUS\\G。",
    "「运维」不只是救火：可观测性、容量规划、变更管理和故障复盘同样重要。",
    "如果 Nginx 返回 502 Bad Gateway，多半是上游服务未启动、端口不对或者超时设置过短。",
    "我们使用 Ansible 批量下发配置；剧本（playbook）应当是幂等的，重复执行不会改变结果。",
    "CI 流水线失败：单元测试通过，但镜像推送到 Harbor 时报 401 未授权，需要重新 docker login。",
    "內存洩漏排查：用 jmap -histo 觀察對象數量，配合 MAT 分析堆轉儲文件。",  # traditional characters
    "问：什么是 SLO？答：服务等级目标，例如 99.9% 的请求在 300ms 内完成。",
]
EN = [
    "The deployment rolled out to 3/3 replicas, but the readiness probe kept failing on port 8080.",
    "Don't restart the whole cluster; it's enough to cordon the node, drain it, and reboot.",
    "WE'LL ROLL BACK IF THE ERROR BUDGET IS EXHAUSTED — THAT'S THE POLICY, ISN'T IT? They'd agree.",
    "Blue/green deploys keep two identical environments; the router flips traffic in one step.",
    "I'm sure you've seen OOMKilled before: the container exceeded its memory limit (137 exit code).",
    "Terraform's plan showed 12 to add, 0 to change, 4 to destroy — review it before you apply.",
    "Use exponential back-off with jitter: sleep = min(cap, base * 2 ** attempt) * random().",
]
CODE = [
    'def retry(fn, attempts=5, base=0.5):\n    for i in range(attempts):\n        try:\n            return fn()\n'
    '        except IOError as e:\n            time.sleep(base * 2 ** i)\n    raise RuntimeError("gave up")\n',
    "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  labels: {app: web, tier: frontend}\nspec:\n"
    "  replicas: 3\n  template:\n    spec:\n      containers:\n        - name: web\n          image: nginx:1.25.3\n"
    "          resources:\n            limits: {cpu: \"500m\", memory: 256Mi}\n",
    "#!/usr/bin/env bash\nset -euo pipefail\nfor ns in $(kubectl get ns -o name); do\n"
    "  kubectl -n \"${ns#namespace/}\" get pods --field-selector=status.phase!=Running 2>/dev/null || true\ndone\n",
    "FROM python:3.12-slim AS build\nWORKDIR /app\nCOPY requirements.txt .\nRUN pip install --no-cache-dir -r requirements.txt\n"
    "EXPOSE 8000\nCMD [\"gunicorn\", \"-w\", \"4\", \"app:app\"]\n",
    'SELECT host, COUNT(*) AS n FROM alerts WHERE ts >= NOW() - INTERVAL \'1 hour\' GROUP BY host HAVING n > 10;\n',
    'func handler(w http.ResponseWriter, r *http.Request) {\n\tif r.Method != http.MethodGet {\n'
    '\t\thttp.Error(w, "method not allowed", 405)\n\t\treturn\n\t}\n\tfmt.Fprintf(w, "ok %d\\n", time.Now().Unix())\n}\n',
    '{"level":"error","ts":1718000000.123,"caller":"server/main.go:42","msg":"dial tcp 10.0.0.7:5432: i/o timeout"}\n',
    "\tif (x&&y||!z) { a[i++] = b >> 2; }\r\n\t\treturn 0x7fffffff;   \r\n",
]
EMOJI = ["🚀 部署成功 ✅", "🔥 P0 incident 🚨🚨", "👩🏽‍💻 on-call 👨‍👩‍👧", "🇨🇳🇺🇸 region failover", "😂😅🙏🏻 thanks!",
         "⚠️ disk 95%", "🐳 + ☸️ = ❤️", "🧑‍🚒 firefighting 🤦‍♂️"]
EDGE = [
    "Cafe\u0301 vs Café; A\u030a vs Å; \uac00 vs \u1100\u1161 (Hangul jamo)",  # NFD input: NFC must apply
    "Ｆｕｌｌｗｉｄｔｈ　ｓｐａｃｅ　１２３　，。！？",
    "日本語のログ：エラーが発生しました。한국어 로그: 오류가 발생했습니다. Журнал: ошибка диска. خطأ في الخادم",
    "∑ᵢ xᵢ² ≤ ε·10⁻⁶ → ∞; ½ ¾ ⅔; ① ② ③; Ⅻ",
    "tabs\t\tand   spaces   \n\n\n   trailing   \n\r\n\r\nCRLF\r\n",
    "numbers 1234567890 3.14159 -42 1e-9 0xDEADBEEF ١٢٣ ४५६",
    "the model said <|im_end|> then <|endoftext|> and <|extra_7|> <|im_start|>user\n",
    "zero\u200bwidth\u200djoiner\ufeffbom and soft\u00adhyphen",
    "it'S IT'LL we'D you'RE they'VE I'M can't'n't",
    "",
]


def _log_line(rng: random.Random) -> str:
    ts = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:" \
         f"{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z"
    ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
    kinds = [
        f'{ip} - - [{ts}] "GET /api/v1/orders/{rng.randint(1, 10**6)}?page={rng.randint(1, 9)} HTTP/1.1" '
        f'{rng.choice([200, 301, 404, 499, 502, 504])} {rng.randint(0, 99999)} "-" "curl/8.{rng.randint(0, 9)}.0"',
        f"{ts} ERROR [{rng.choice(['main', 'pool-3-thread-7', 'kafka-consumer'])}] c.e.OrderService - "
        f"timeout after {rng.randint(100, 30000)}ms traceId={rng.getrandbits(64):016x}",
        f"Warning  BackOff  {rng.randint(1, 59)}m (x{rng.randint(2, 400)} over 2h)  kubelet  Back-off restarting failed "
        f"container app in pod web-{rng.getrandbits(32):08x}-{rng.choice('abcdxyz')}{rng.randint(0, 9)}",
        f"{ts} 节点 node-{rng.randint(1, 64)} CPU 使用率 {rng.uniform(0, 100):.1f}%，内存 {rng.randint(1, 512)}Gi，"
        f"磁盘 IO 等待 {rng.uniform(0, 50):.2f}%",
        f"    at com.example.pay.Gateway.call(Gateway.java:{rng.randint(10, 999)})\n"
        f"Caused by: java.net.SocketTimeoutException: Read timed out",
        f"kernel: [{rng.uniform(0, 99999):.6f}] Out of memory: Killed process {rng.randint(100, 65535)} (java) "
        f"total-vm:{rng.randint(10**6, 10**7)}kB, anon-rss:{rng.randint(10**5, 10**6)}kB",
    ]
    return rng.choice(kinds)


def _noise(rng: random.Random) -> str:
    """Code points from many blocks, mixed with spaces, newlines and digits."""
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x2000, 0x2BFF)]
    out = []
    for _ in range(rng.randint(5, 40)):
        lo, hi = rng.choice(blocks)
        out.append(chr(rng.randint(lo, hi)) if rng.random() < 0.85 else rng.choice([" ", "\n", "  ", "\t", "7", "'s"]))
    return "".join(out)


def corpus(min_bytes: int = 60_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = ZH + EN + CODE + EMOJI + EDGE  # every hand-written piece at least once
    pools = [ZH, EN, CODE, EMOJI, EDGE]
    while sum(len(p.encode()) for p in parts) < min_bytes:
        r = rng.random()
        if r < 0.3:
            parts.append(_log_line(rng))
        elif r < 0.4:
            parts.append(_noise(rng))
        elif r < 0.55:  # sentences glued without separators, as in chat messages
            parts.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(2, 4))))
        else:
            parts.append(rng.choice(rng.choice(pools)))
    return "".join(p + rng.choice(["\n", "\n\n", " ", "", "\r\n", "\t"]) for p in parts)


@pytest.fixture(scope="module")
def reference():
    tiktoken = pytest.importorskip("tiktoken", reason="the reference encoder is tiktoken (pip install tiktoken)")
    from tiktoken.load import load_tiktoken_bpe

    from devops_cli.convert.tokenizer import QWEN_REGEX, SPECIALS

    ranks = load_tiktoken_bpe(str(need_shared("qwen.tiktoken") / "qwen.tiktoken"))
    specials = {t: 151643 + i for i, t in enumerate(SPECIALS)}
    enc = tiktoken.Encoding("qwen", pat_str=QWEN_REGEX, mergeable_ranks=ranks, special_tokens=specials)
    return lambda text: enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from devops_cli.convert.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(need_shared("qwen.tiktoken") / "qwen.tiktoken").save_pretrained(out)
    (out / "config.json").write_text('{"model_type": "qwen2"}')  # AutoTokenizer reads it, as it would after convert
    return out


@pytest.fixture(scope="module")
def converted(saved):
    """The tokenizer as every command loads it (modeling.load_tokenizer -> AutoTokenizer)."""
    from devops_cli.modeling import load_tokenizer

    return load_tokenizer(str(saved), "chatml")


def test_tokenizer_json_alone_equals_tiktoken(reference, saved):
    """tokenizer.json as other tools read it (tokenizers, vLLM, TGI): its own normaliser, regex, merges."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(saved / "tokenizer.json"))
    text = corpus()
    ids = raw.encode(text, add_special_tokens=False).ids
    assert ids == reference(text)
    assert raw.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def test_corpus_is_mixed_and_big_enough():
    text = corpus()
    assert len(text.encode()) >= 50_000
    for sample in ("Pod", "部署", "🚀", "kubectl", "def ", "Caused by", "\r\n", "<|im_end|>", "e\u0301"):
        assert sample in text
    assert unicodedata.normalize("NFC", text) != text  # NFD input is there, so NFC matters


def test_ids_equal_tiktoken_on_the_whole_corpus(reference, converted):
    text = corpus()
    want = reference(text)
    got = converted.encode(text, add_special_tokens=False)
    if got != want:
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        pytest.fail(f"first difference at token {i}: {got[i - 3:i + 5]} vs tiktoken {want[i - 3:i + 5]} "
                    f"({converted.decode(want[max(0, i - 3):i + 5])!r})")
    assert len(want) > 15_000
    assert converted.decode(got) == unicodedata.normalize("NFC", text)


def test_ids_equal_tiktoken_piece_by_piece(reference, converted):
    """Short texts (no context to hide a bad merge) and each hand-written piece on its own."""
    pieces = ZH + EN + CODE + EMOJI + EDGE + corpus(20_000, seed=1).splitlines()
    batch = converted(pieces, add_special_tokens=False)["input_ids"]
    bad = [(p, got, reference(p)) for p, got in zip(pieces, batch) if got != reference(p)]
    assert not bad, f"{len(bad)} of {len(pieces)} pieces differ, e.g. {bad[0]}"


def test_specials_ids_and_chat_format(converted):
    from devops_cli.convert.tokenizer import SPECIALS

    assert [converted.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(151643, 151851))
    assert len(converted) == 151851
    assert (converted.eos_token, converted.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    text = converted.apply_chat_template([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "r1"},
                                          {"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
                    "<|im_start|>assistant\nr1<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")


def test_vocabulary_file_is_the_published_one():
    import hashlib

    data = (need_shared("qwen.tiktoken") / "qwen.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186", \
        f"{SHARED_V1 / 'qwen.tiktoken'} is not the file SOURCES.md describes"
