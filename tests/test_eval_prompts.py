"""Prompt strings of every protocol, character for character as ../shared/notes/eval-protocol.md gives
them, on the real exam questions (skipped when ../shared/data/devops-exam is absent). No model here,
except the ChatML encoding test, which uses the tiny model's tokenizer."""

from __future__ import annotations

import csv

import pytest

from conftest import SHARED
from devops_cli.eval import prompts
from devops_cli.eval.exam import load_local

DATA = SHARED / "data" / "devops-exam"
pytestmark = pytest.mark.skipif(not (DATA / "cmmlu").is_dir(), reason=f"exam data not found at {DATA} (../shared)")

H = "以下是关于开发运维领域的单项选择题，请选出其中的正确答案。请直接输出选项。\n"
# cmmlu/test/computer_science.csv row 0 as shipped: CJK radicals U+2F64 U+2F00, not 用一
CS_Q = "\u2f64\u2f00个字节最多能编出（ ）不同的码"
CN_Q = "使用位填充方法，以01111110为位首flag，数据为011011111111111111110010，求问传送时要添加几个0____"


@pytest.fixture(scope="module")
def exam():
    return {s.name: s for s in load_local(DATA, "computer_science,computer_network", 5)}


def rows(path):
    """The dev rows straight from the CSV (independent of exam.py): [question, A, B, C, D, answer]."""
    with open(path, newline="", encoding="utf-8") as f:
        data = list(csv.reader(f))[1:]
    return [[r[1], r[2], r[3], r[4], r[5], r[6]] for r in data]


ZERO = {
    ("devops-eval", "computer_science"): H + f"问题：{CS_Q}\nA. 128个\nB. 256个\nC. 16个\nD. 8个\n答案：",
    ("cmmlu", "computer_science"): "以下是关于计算机科学的单项选择题，请直接给出正确答案的选项。\n\n"
    + f"题目：{CS_Q}\nA. 128个\nB. 256个\nC. 16个\nD. 8个\n答案是：",
    ("ceval", "computer_science"): "以下是中国关于计算机科学考试的单项选择题，请选出其中的正确答案。\n\n"
    + f"{CS_Q}\nA. 128个\nB. 256个\nC. 16个\nD. 8个\n答案：",
    ("lm-eval", "computer_science"): "以下是关于计算机科学的单项选择题，请直接给出正确答案的选项。\n\n"
    + f"{CS_Q}\nA. 128个\nB. 256个\nC. 16个\nD. 8个\n答案：",
    ("devops-eval", "computer_network"): H + f"问题：{CN_Q}\nA. 1\nB. 2\nC. 3\nD. 4\n答案：",
    ("cmmlu", "computer_network"): "以下是关于计算机网络的单项选择题，请直接给出正确答案的选项。\n\n"
    + f"题目：{CN_Q}\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：",
    ("ceval", "computer_network"): "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
    + f"{CN_Q}\nA. 1\nB. 2\nC. 3\nD. 4\n答案：",
    ("lm-eval", "computer_network"): "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\n"
    + f"{CN_Q}\nA. 1\nB. 2\nC. 3\nD. 4\n答案：",
}  # fmt: skip


@pytest.mark.parametrize("protocol,subject", list(ZERO))
def test_zero_shot_prompt_is_exact(exam, protocol, subject):
    assert prompts.build(protocol, exam[subject], exam[subject].test[0], 0) == ZERO[(protocol, subject)]


def test_five_shot_devops_eval_ceval_literal(exam):
    """The whole 5-shot devops-eval prompt of C-Eval computer_network val row 0, written out."""
    ex = [("下列设备属于资源子网的是____。", "计算机软件", "网桥", "交换机", "路由器", "A"),
          ("滑动窗口的作用是____。", "流量控制", "拥塞控制", "路由控制", "差错控制", "A"),
          ("在OSI参考模型中，直接为会话层提供服务的是____。", "应用层", "表示层", "传输层", "网络层", "C"),
          ("协议是指在____之间进行通信的规则或约定。", "同一结点的上下层", "不同结点", "相邻实体", "不同结点对等实体", "D"),
          ("主机甲与主机乙之间使用后退N帧协议(GBN)传输数据，甲的发送窗口尺寸为1000，数据帧长为1000字节，信道带宽为100Mbps，"
           "乙每收到一个数据帧立即利用一个短帧(忽略其传输延迟)进行确认，若甲、乙之间的单向传播延迟是50ms，"
           "则甲可以达到的最大平均数据传输速率约为____。", "10Mbps", "20Mbps", "80Mbps", "100Mbps", "C")]  # fmt: skip
    expected = "".join(f"{H}问题：{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案：{x}\n" for q, a, b, c, d, x in ex)
    expected += H + ZERO[("devops-eval", "computer_network")][len(H) :]
    s = exam["computer_network"]
    assert prompts.build("devops-eval", s, s.test[0], 5) == expected
    assert expected.count(H) == 6 and "\n\n" not in expected  # header per exemplar, no blank lines


@pytest.mark.parametrize("subject,dev", [("computer_science", "cmmlu/dev/computer_science.csv"),
                                         ("computer_network", "ceval/dev/computer_network_dev.csv")])  # fmt: skip
@pytest.mark.parametrize("protocol", prompts.PROTOCOLS)
def test_five_shot_prompt_follows_the_notes(exam, protocol, subject, dev):
    """5 shots: the notes' templates applied to the first five dev rows as read straight from the CSV."""
    zero = ZERO[(protocol, subject)]
    shots = rows(DATA / dev)[:5]
    if protocol == "devops-eval":
        block = "".join(f"{H}问题：{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案：{x}\n" for q, a, b, c, d, x in shots)
        expected = block + zero
    else:
        head_end = zero.index("\n\n") + 2
        item = {"cmmlu": "题目：{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案是：{x}\n\n",
                "ceval": "{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案：{x}\n\n",
                "lm-eval": "{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案： {x}\n\n"}[protocol]  # fmt: skip
        strip = protocol == "lm-eval"
        block = "".join(item.format(q=q.strip() if strip else q, a=a, b=b, c=c, d=d, x=x) for q, a, b, c, d, x in shots)
        expected = zero[:head_end] + block + zero[head_end:]
    got = prompts.build(protocol, exam[subject], exam[subject].test[0], 5)
    assert got == expected
    if subject == "computer_science":
        assert "A. ARP \n" in got  # trailing space of the cell kept
        assert "\u2f06维表格" in got  # radicals kept, not NFKC-normalised


def test_options_scored(exam):
    assert prompts.option_strings("devops-eval", False) == ["A", "B", "C", "D"]
    assert prompts.option_strings("lm-eval", False) == [" A", " B", " C", " D"]
    assert prompts.option_strings("lm-eval", True) == ["A", "B", "C", "D"]


def test_chatml_is_encoded_piece_by_piece(tokenizer, exam):
    s = exam["computer_network"]
    text = prompts.build("devops-eval", s, s.test[0], 5)
    system, user = prompts.split_system("devops-eval", s, text, None)
    assert system == "you are a helpful assistant" and user == text
    ids = prompts.encode_chat(tokenizer, system, user)

    def enc(t):
        return tokenizer.encode(t, add_special_tokens=False)

    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    expected = ([start] + enc("system") + enc("\n") + enc("you are a helpful assistant") + [end] + enc("\n")
                + [start] + enc("user") + enc("\n") + enc(text) + [end] + enc("\n")
                + [start] + enc("assistant") + enc("\n"))  # fmt: skip
    assert ids == expected
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
