"""Corpora for the tokenizer-tool tests: code from this machine's standard library, Chinese
from the system's zh_CN gettext catalogs (real translated UI text), English from the system's
license texts; deterministic synthetic stand-ins when a machine lacks the last two."""

from __future__ import annotations

import gettext
import glob
import random
import sysconfig
from pathlib import Path

import pytest

from codeshell.tokenizer_tools.corpus import iter_texts

STDLIB = Path(sysconfig.get_paths()["stdlib"])
WORDS = ("我们 你们 他们 这个 那个 数据 文件 程序 代码 函数 模型 训练 系统 用户 时间 问题 方法 结果 目录 设置 "
         "安装 错误 打开 关闭 保存 删除 选择 输入 输出 网络 服务 配置 更新 版本 语言 中文 编辑 窗口 显示 "
         "打印 可以 需要 没有 已经 正在 如果 因为 所以 但是 然后 一个 一些 所有 其他 自动 当前 默认").split()


def chinese_texts() -> list[str]:
    out = []
    for f in sorted(glob.glob("/usr/share/locale/zh_CN/LC_MESSAGES/*.mo")):
        try:
            with open(f, "rb") as fh:
                cat = gettext.GNUTranslations(fh)._catalog
        except Exception:
            continue
        out += [v for v in cat.values() if isinstance(v, str) and v.strip()]
    if sum(map(len, out)) > 200_000:
        return out
    rng = random.Random(0)  # fallback: Zipf-distributed common words, punctuated
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    return ["".join(rng.choices(WORDS, weights, k=rng.randint(3, 12))) + rng.choice("。，！？")
            for _ in range(30_000)]


@pytest.fixture(scope="session")
def zh() -> tuple[list[str], list[str]]:
    t = chinese_texts()
    return t[::2], t[1::2]  # train, held out


@pytest.fixture(scope="session")
def code() -> list[tuple[str, str]]:
    return list(iter_texts([STDLIB / d for d in ("json", "email", "http", "html", "urllib")]))


@pytest.fixture(scope="session")
def english() -> list[tuple[str, str]]:
    lic = Path("/usr/share/common-licenses")
    texts = list(iter_texts([lic])) if lic.is_dir() else []
    if sum(len(t) for _, t in texts) < 50_000:
        texts.append(("LICENSE", (STDLIB.parent / "LICENSE.txt").read_text() if (STDLIB / "LICENSE.txt").exists()
                      else (STDLIB / "this.py").read_text()))
    return texts
