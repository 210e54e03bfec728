"""What training a LoRA adapter asks for: the adapter's shape, the recipe, the examples (pydantic only).

Light on purpose: the parameter type's settings, its operations and the
client read these without importing torch. The training itself is
:func:`memos.plugins.models.lora.train`; docs/parameter.md explains each choice.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MODULE = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"  # one module name of the model (q_proj, down_proj, ...)


class LoraShape(BaseModel):
    """The shape of a LoRA adapter: rank, scaling and the modules it adapts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, le=4096, description="LoRA rank r (a fused adapter's may be the sum of several).")
    alpha: float = Field(16.0, gt=0, le=4096, description="LoRA alpha: the update is scaled by alpha / rank.")
    target_modules: tuple[Annotated[str, Field(pattern=MODULE)], ...] = Field(
        ("q_proj", "v_proj"), min_length=1, max_length=16,
        description="Module names the adapter is attached to (attention queries and values by default).")


class Recipe(LoraShape):
    """How a distillation trains: the adapter's shape, the optimiser, and what keeps general knowledge."""

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r: higher stores more and disturbs more.")

    learning_rate: float = Field(3e-3, gt=0, le=1.0, description="AdamW learning rate (linear decay to 0).")
    epochs: float = Field(12.0, gt=0, le=1000, description="Passes over the facts when steps is not given.")
    steps: int | None = Field(None, ge=1, le=100_000, description="Optimiser steps (None: from epochs).")
    batch_size: int = Field(8, ge=1, le=256, description="Facts per step.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the adapter's initialisation and the order.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout while training.")
    kl_weight: float = Field(
        5.0, ge=0.0, le=100.0,
        description="Weight of the KL divergence to the base model on general prompts answered by the base "
                    "model itself (replay); 0 turns the replay off.")
    replay_batch: int = Field(4, ge=0, le=256, description="Replay prompts per step.")
    stop_loss: float = Field(
        0.15, ge=0.0, le=100.0,
        description="Stop early once the mean loss on the facts over the last pass falls below this "
                    "(the facts are learnt; more steps would only disturb the rest).")
    max_tokens: int = Field(384, ge=8, le=8192, description="Tokens of one example kept (the rest is cut).")

    @property
    def shape(self) -> LoraShape:
        return LoraShape(rank=self.rank, alpha=self.alpha, target_modules=self.target_modules)


class Example(BaseModel):
    """One training example made from a memory: a question and its answer, or a text to learn as it is."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["qa", "text"]
    question: str = ""  # kind "qa": asked as the user's turn of a chat
    answer: str = ""  # kind "qa": the assistant's turn, the only tokens the loss is taken on
    text: str = ""  # kind "text": every token is learnt
