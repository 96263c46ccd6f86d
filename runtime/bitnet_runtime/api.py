"""The Python API: a Hugging Face checkpoint running on a compiled artifact.

    from bitnet_runtime.api import LLM
    llm = LLM("microsoft/bitnet-b1.58-2B-4T", artifact="artifacts/2b-4t-native", threads=2)
    print(llm.generate("The capital of France is", max_new_tokens=16).text)

Loading checks everything before native code runs (artifact, checkpoint, config, shapes) and
converts the weights into the artifact's layouts once (see ``weights``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import services
from .artifact import Artifact
from .checkpoint import locate
from .errors import UserError
from .generate import ChatSession, GenerationResult, generate
from .model import Model
from .model_config import load_config
from .output_layer import OUTPUT_FORMATS
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import ModelWeights


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class LLM:
    """A model, its tokenizer and its kernels. ``output``: the output layer's format, "f16"
    (the checkpoint's values in float16), "i8" (per-row int8, a quarter of float32's bytes) or
    "f32" (the checkpoint's exact values, by numpy: for checking)."""

    def __init__(
        self,
        model: str | Path,
        artifact: str | Path | Artifact,
        output: str = "f16",
        context: int | None = None,
        threads: int | None = None,
        echo: Callable[[str], None] = _stderr,
    ):
        if output not in OUTPUT_FORMATS:
            raise UserError(f"unknown output layer format {output!r}: choose {', '.join(OUTPUT_FORMATS)}")
        if threads is not None:
            services.set_num_threads(threads)
        self.model_dir = locate(str(model))
        self.config = load_config(self.model_dir)
        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
        self.weights = ModelWeights(self.model_dir, self.config, self.artifact, echo)
        self.model = Model(self.artifact, self.weights, output, context)
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_dir(self.model_dir)
        return self._tokenizer

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        sampling: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Continue a prompt (text, tokenized with BOS, or token ids as they are)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        return generate(self.model, self.tokenizer, ids, max_new_tokens, sampling, stop, on_text)

    def chat(self, sampling: SamplingParams = SamplingParams(), system_prompt: str | None = None) -> ChatSession:
        return ChatSession(self.model, self.tokenizer, sampling, system_prompt)
