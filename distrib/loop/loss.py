"""From a batch to a loss: the conventions users already have, so no glue code is needed.

- A Mapping batch is passed as keywords, `model(**batch)`, and a model output with a `loss`
  (attribute or key: the Hugging Face convention) is the loss.
- An `(inputs, labels)` batch is `loss_fn(model(inputs), labels)` (cross-entropy by default), with
  accuracy where the outputs are class logits.
- Anything else is a user step function, `step_fn(model, batch) -> loss` or `-> (loss, metrics)`.

A model (or step function) that accepts `num_items_in_batch` gets the optimizer step's global
count of items (label tokens) and returns a loss already divided by it (Hugging Face's
convention); other losses are means over their micro-batch and distrib weights them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distrib.errors import BatchError
from distrib.observe.metrics import count_correct

LossFn = Callable[[Any, Any], torch.Tensor]
StepFn = Callable[..., Any]

IGNORE_INDEX = -100
"""The label that losses ignore (PyTorch's cross_entropy default, Hugging Face's padding label)."""


def label_tokens(*, shift: bool) -> Callable[[Any], torch.Tensor]:
    """An item counter: the label tokens a loss averages over (labels != -100), as a device tensor.

    `shift=True` for causal language models, whose loss predicts token t+1 from position t, so a
    row's first label is never a target; `shift=False` for masked-LM and sequence labelling.
    Labels are `batch["labels"]` for a mapping batch, else the batch's second element.
    """

    def count(batch: Any) -> torch.Tensor:
        labels = batch["labels"] if isinstance(batch, Mapping) else batch[1]
        return (labels[..., 1:] if shift else labels).ne(IGNORE_INDEX).sum()

    return count


def _accepts(fn: Callable[..., Any], name: str, *, var_keyword: bool) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or (var_keyword and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()))


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face `PreTrainedModel` (duck-typed: distrib does not import transformers)."""
    return hasattr(model, "config") and hasattr(type(model), "loss_function")


def default_items(model: nn.Module, sample: Any) -> Callable[[Any], torch.Tensor] | None:
    """Token counting for a Hugging Face model that takes `num_items_in_batch` and a batch with labels; else None (samples)."""
    if not (isinstance(sample, Mapping) and "labels" in sample and is_hf_model(model) and model_takes_num_items(model)):
        return None
    config = model.config
    causal = not getattr(config, "is_encoder_decoder", False) and (
        getattr(model, "loss_type", None) == "ForCausalLM" or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    )
    return label_tokens(shift=causal)


def model_takes_num_items(model: nn.Module) -> bool:
    """Hugging Face's test: the model says so (`accepts_loss_kwargs`), or its forward takes **kwargs."""
    declared = getattr(model, "accepts_loss_kwargs", None)
    if declared is not None:
        return bool(declared)
    return _accepts(model.forward, "num_items_in_batch", var_keyword=is_hf_model(model))


def split_inputs_labels(batch: Any) -> tuple[Any, Any]:
    """`(inputs, labels)` from a 2-sequence or a mapping with `inputs` and `labels` keys."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not hasattr(batch, "_fields"):
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and set(batch) == {"inputs", "labels"}:
        return batch["inputs"], batch["labels"]
    raise BatchError(
        f"loss_fn needs (inputs, labels) batches, got a {type(batch).__name__}. HINT: have the Dataset return "
        "(inputs, labels); or drop loss_fn and return a dict the model takes as keywords (its output's .loss is "
        "used); or pass step_fn=lambda model, batch: ... returning the loss."
    )


@dataclasses.dataclass(frozen=True)
class StepOutput:
    loss: torch.Tensor
    """The loss to backpropagate (before distrib's weight)."""
    metrics: dict[str, Any]
    """Means over the micro-batch's items, `loss` included, or `(sum, count)` pairs (device tensors)."""
    normalized: bool
    """True when `loss` is already divided by the count passed as num_items_in_batch (in training, this
    rank's count over the step; `MicroBatch.normalized_weight` scales it to the global one)."""


def _output_loss(out: Any) -> torch.Tensor | None:
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


class LossStep:
    """Computes a micro-batch's loss and metrics the way the user's model and batch expect (no backward, no optimizer)."""

    def __init__(self, model: nn.Module, *, loss_fn: LossFn | None = None, step_fn: StepFn | None = None) -> None:
        if loss_fn is not None and step_fn is not None:
            raise BatchError("Pass loss_fn or step_fn, not both. HINT: compute the loss inside step_fn.")
        self.loss_fn, self.step_fn = loss_fn, step_fn
        self.pass_items = _accepts(step_fn, "num_items_in_batch", var_keyword=False) if step_fn is not None else model_takes_num_items(model)

    def __call__(self, model: nn.Module, batch: Any, num_items: Any = None) -> StepOutput:
        """`num_items`: the count to normalise by (the step's global items in training, the batch's own in eval)."""
        kwargs = {"num_items_in_batch": num_items} if self.pass_items and num_items is not None else {}
        if self.step_fn is not None:
            return self._from_user(self.step_fn(model, batch, **kwargs), bool(kwargs))
        if isinstance(batch, Mapping) and self.loss_fn is None:
            out = model(**batch, **kwargs)
            loss = _output_loss(out)
            if loss is None:
                raise BatchError(
                    f"The model got a dict batch (keys {sorted(batch)}) as keywords but its output has no `loss`. "
                    "HINT: include `labels` in the batch (Hugging Face models then return .loss), or pass "
                    "loss_fn=... with (inputs, labels) batches, or step_fn=lambda model, batch: ... returning the loss."
                )
            return StepOutput(loss=loss, metrics={"loss": loss}, normalized=bool(kwargs))
        inputs, labels = split_inputs_labels(batch)
        out = model(inputs)
        loss = (self.loss_fn or F.cross_entropy)(out, labels)
        metrics: dict[str, Any] = {"loss": loss}
        correct = count_correct(out, labels)
        if correct is not None:
            metrics["accuracy"] = (correct, labels.shape[0])  # a count, so the global mean is exact
        return StepOutput(loss=loss, metrics=metrics, normalized=False)

    def _from_user(self, result: Any, normalized: bool) -> StepOutput:
        loss, metrics = result if isinstance(result, tuple) and len(result) == 2 else (result, {})
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise BatchError(
                f"step_fn must return a scalar loss tensor or (loss, {{name: value}}), got {type(result).__name__}. "
                "HINT: return loss, or (loss, {'accuracy': acc})."
            )
        if not isinstance(metrics, Mapping):
            raise BatchError(f"step_fn's metrics must be a dict of name -> value (a mean over the batch) or (sum, count), got {type(metrics).__name__}.")
        return StepOutput(loss=loss, metrics={"loss": loss, **metrics}, normalized=normalized)
