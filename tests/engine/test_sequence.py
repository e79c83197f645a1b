"""A sequence's streaming state: the text held back because it may begin a stop string."""

import random

from codeshell.engine.sampling import SamplingParams
from codeshell.engine.sequence import Sequence


class _Chars:  # a tokenizer whose token t decodes to the character chr(t)
    def decoder(self, skip_special_tokens):
        class D:
            def add(self, t):
                return chr(t)

            def flush(self):
                return ""
        return D()


class _NoSampler:
    def observe(self, t):
        pass


def _textbook_held_back(text: str, stops: list[str]) -> int:
    # the longest tail, shorter than the longest stop, that some stop string begins with
    m = max(len(s) for s in stops)
    return max((k for k in range(1, min(len(text), m - 1) + 1) if any(s.startswith(text[-k:]) for s in stops)),
               default=0)


def test_held_back_text_is_the_longest_tail_that_may_begin_a_stop():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        seq = Sequence("r", 0, [1], SamplingParams(max_tokens=100, stop=stops), _NoSampler(), 0, _Chars(), None)
        for _ in range(rng.randint(0, 12)):
            seq.append(ord(rng.choice("abc\n")), None, 10**6)
            if seq.finished:
                break
            assert seq._held_back() == _textbook_held_back(seq.text, stops), (seq.text, stops)
            out = seq.output()  # the stream never shows held-back text
            assert out.text == seq.text[:len(seq.text) - seq._held_back()]
