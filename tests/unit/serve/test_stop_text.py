"""Stop sequences on a text that arrives in pieces: whatever the cut, the pieces given out
join to the text before the first stop sequence (the reference: str.find on the whole)."""

from __future__ import annotations

import random

import pytest

from qlora.serve.stop_text import StopText


def reference(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    found = [text.find(s) for s in stops if s in text]
    return (text[: min(found)], True) if found else (text, False)


def streamed(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    stop = StopText(stops)
    out = "".join(stop.feed(p) for p in pieces) + stop.flush()
    return out, stop.stopped


def random_cut(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(8, len(text) - 1))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


CASES = [
    ("Hello world<|im_end|>after", ("<|im_end|>",)),
    ("no stop in here at all", ("STOP",)),
    ("ends with a prefix <|im", ("<|im_end|>",)),
    ("aaab", ("aab",)),  # the stop starts inside a run of its own first letter
    ("x END y STOP z", ("STOP", "END")),  # the earlier one wins, whatever the order
    ("ST ST STOP", ("STOP",)),
    ("\n\nUser: hi", ("\n\n", "User:")),
]


@pytest.mark.parametrize(("text", "stops"), CASES)
def test_any_cut_of_the_text_gives_what_the_whole_text_gives(text, stops):
    rng = random.Random(text)
    expected = reference(text, stops)
    assert streamed([text], stops) == expected
    assert streamed(list(text), stops) == expected  # one character at a time
    for _ in range(50):
        assert streamed(random_cut(text, rng), stops) == expected


def test_text_is_given_out_as_soon_as_it_cannot_start_a_stop():
    stop = StopText(("<|im_end|>",))
    assert stop.feed("Hello <") == "Hello "  # "<" may begin the stop: held
    assert stop.feed("b>") == "<b>"
    assert stop.feed(" <|im_e") == " "
    assert stop.feed("nd|> more") == "" and stop.stopped
    assert stop.feed("ignored") == "" and stop.flush() == ""


def test_no_stop_sequences_passes_everything_through():
    stop = StopText(())
    assert stop.feed("a") == "a" and stop.feed("") == "" and stop.flush() == ""
