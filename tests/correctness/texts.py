"""200 varied texts for MiniLM parity: short, long, cut at the max length, non-Latin scripts, emoji."""

from __future__ import annotations

import random

SCRIPTS = [
    "机器学习模型把文本变成向量，语义相近的句子距离也相近。",
    "検索拡張生成では、埋め込みベクトルで関連する文書を探します。",
    "임베딩 서버는 로컬에서 실행되어 데이터가 외부로 나가지 않습니다.",
    "Модель преобразует текст в векторы для семантического поиска.",
    "يحوّل النموذج النص إلى متجهات للبحث الدلالي.",
    "मॉडल पाठ को वेक्टर में बदलता है ताकि खोज बेहतर हो।",
    "Το μοντέλο μετατρέπει το κείμενο σε διανύσματα.",
    "המודל ממיר טקסט לווקטורים לחיפוש סמנטי.",
    "โมเดลแปลงข้อความเป็นเวกเตอร์เพื่อการค้นหา",
    "Ünïcödé façade — naïve café, Straße, œuvre, Ångström.",
]
EMOJI = ["🚀", "🔥", "👩‍👩‍👧", "🇯🇵", "🤖", "✅", "😂", "🧠", "📈", "🍌"]
WORDS = ("latency throughput embedding vector cache batching server local model token image query passage "
         "retrieval agent memory index quantisation kernel semantic search apple silicon metal cuda "
         "banana bread recipe weather paris tokyo river mountain").split()


ONE_TOKEN = "the a cat dog sat ran on in and to of it is was red blue big small".split()


def varied_texts(n: int = 200, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        kind = len(out) % 8
        if kind == 0:  # short
            out.append(rng.choice(WORDS))
        elif kind == 1:  # a sentence
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))).capitalize() + ".")
        elif kind == 2:  # long: far past 256 tokens, cut by truncation
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(300, 600))))
        elif kind == 3:  # right at the limit: one-token words, 252..260 tokens with [CLS]/[SEP]
            out.append(" ".join(rng.choice(ONE_TOKEN) for _ in range(rng.randint(250, 258))))
        elif kind == 4:  # non-Latin scripts
            out.append(rng.choice(SCRIPTS) + " " + rng.choice(SCRIPTS))
        elif kind == 5:  # emoji and mixed
            out.append(" ".join(rng.choice(WORDS + EMOJI) for _ in range(rng.randint(3, 15))))
        elif kind == 6:  # numbers, code, punctuation
            out.append(f"def f{rng.randint(0, 99)}(x): return x**{rng.randint(2, 9)}  # {rng.random():.5f} ({rng.choice(WORDS)})!?")
        else:  # case and whitespace
            out.append("   " + " ".join(w.upper() if rng.random() < 0.5 else w for w in rng.sample(WORDS, 6)) + "\t\n ")
    return out
