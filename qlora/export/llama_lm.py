"""A GGUF file under llama.cpp as an lm-eval model: the same tasks the PyTorch variants run,
scored the same way, on the artifact users deploy.

lm-eval's own "gguf" model talks to a llama.cpp server over HTTP and asks it for top-k
log-probabilities, which cannot score a continuation token outside the top k. This one
calls llama-cpp-python in process with every position's logits kept (`logits_all`), so a
continuation's log-likelihood is exact: the sum of log-softmax over its tokens.

Tokenization follows lm-eval's HFLM: context and continuation are encoded together and
split where the context's own encoding ends; special tokens in the text (a chat template's
markers) are parsed as the markers they are; no BOS is added (the prompts are already
rendered with the chat template, which holds whatever starts a conversation). A rolling
log-likelihood (perplexity of a document) starts from the BOS token, or the end-of-text
token where the model has none, in windows of the context size, as HFLM does.
Requests that share a prefix (the choices of one multiple-choice question) reuse its
evaluated positions instead of recomputing them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM

from qlora.core.io import StageError
from qlora.export.llama_open import open_llama


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float64: a sum over a 50,000-token vocabulary in float32 rounds at ~1e-4."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaCppLM(LM):
    """lm-eval's LM interface over `llama_cpp.Llama` (loglikelihood, loglikelihood_rolling,
    generate_until)."""

    def __init__(
        self,
        model_path: Path | str,
        lora_path: Path | str | None = None,
        n_ctx: int = 1024,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        for f in (model_path, lora_path):
            if f is not None and not Path(f).is_file():
                raise StageError(f"{f}: no such GGUF file")
        self.llm = open_llama(
            model_path,
            lora_path,
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,  # every position's logits: exact continuation scores
            seed=0,
            verbose=False,
        )
        self.n_ctx = n_ctx
        self.threads = self.llm.n_threads
        self._cached: list[int] = []  # the tokens whose logits self.llm holds, in order

    def close(self) -> None:
        """Free the model now (at interpreter exit llama-cpp-python's own finaliser can run
        after the library it calls is gone, and prints an error)."""
        self.llm.close()

    # -------------------------------------------------------------- tokens and logits
    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    @property
    def prefix_token(self) -> int:
        bos = self.llm.token_bos()
        return bos if bos >= 0 else self.llm.token_eos()

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of `tokens` (row i predicts token i + 1), reusing the
        positions a previous call evaluated for the same prefix."""
        if len(tokens) > self.n_ctx:
            raise StageError(
                f"a request of {len(tokens)} tokens exceeds the context of {self.n_ctx} "
                "(export.n_ctx)"
            )
        keep = min(common_prefix(self._cached, tokens), len(tokens) - 1)
        self.llm.n_tokens = keep  # eval() drops the cache after it and appends the rest
        self.llm.eval(tokens[keep:])
        self._cached = list(tokens)
        return self.llm.scores[: len(tokens)]

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it)."""
        tokens = (context + continuation)[-self.n_ctx :]
        n = len(continuation)
        logits = self.logits(tokens)[-n - 1 : -1]
        logp = log_softmax(logits)
        target = np.asarray(continuation[-len(logits) :])
        total = float(logp[np.arange(len(target)), target].sum())
        return total, bool((logits.argmax(-1) == target).all())

    # -------------------------------------------------------------- lm-eval's interface
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # As HFLM: trailing spaces of the context belong to the continuation, and the split
        # is where the context's own tokens end in the encoding of the whole.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        if not context:
            return [self.prefix_token], self.encode(continuation)
        whole = self.encode(context + continuation)
        n = len(self.encode(context))
        return whole[:n], whole[n:]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        # Evaluated in token order, so requests sharing a prefix are neighbours.
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0] + pairs[i][1])
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for i in order:
            out[i] = self.score(*pairs[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.encode(text),
                prefix_token=self.prefix_token,
                max_seq_len=self.n_ctx,
                context_len=1,
            )
            out.append(
                sum(
                    self.score(ctx, cont)[0]
                    for ctx, cont in map(lm_utils.make_disjoint_window, windows)
                )
            )
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            out.append(self.greedy(context, gen_kwargs))
        return out

    def greedy(self, context: str, gen_kwargs: dict) -> str:
        """Greedy text after `context`, stopped by any of `until` or the end of a turn."""
        until = gen_kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else list(until)
        max_tokens = int(gen_kwargs.get("max_gen_toks", 256))
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0)) > 0:
            raise StageError("the llama.cpp evaluation decodes greedily only (do_sample false)")
        prompt = self.encode(context)[-(self.n_ctx - max_tokens) :]
        self._cached = []  # create_completion manages the cache itself
        result = self.llm.create_completion(
            prompt=prompt, max_tokens=max_tokens, temperature=0.0, stop=stops or None
        )
        return result["choices"][0]["text"]

    def greedy_tokens(self, prompt: str, count: int) -> Iterable[int]:
        """Exactly `count` greedy tokens after `prompt` (the end of text not obeyed): the
        same work for every model, for timing."""
        self._cached = []
        tokens = self.encode(prompt)
        self.llm.reset()
        for i, token in enumerate(self.llm.generate(tokens, temp=0.0, reset=True)):
            yield token
            if i + 1 >= count:
                break
