"""Capture a model to an FX graph with ``torch.export`` (non-strict, under ``no_grad``).

The result is a :class:`CapturedGraph`: the lifted ATen graph of the exported program, whose parameters
and buffers are placeholders. ``CapturedGraph.tensors`` holds the tensor behind each such placeholder
(shared with the model, not copied) and ``CapturedGraph.fqn`` maps the placeholder to the model's own
parameter name (``model.layers.0.self_attn.q_proj.weight``), so a pass can rewrite a weight and
:meth:`CapturedGraph.write_back` puts it into the original ``nn.Module``.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .errors import CaptureError

#: key under which fxquant keeps its annotations in ``node.meta``
META = "fxquant"


def fxmeta(node: fx.Node) -> dict:
    """fxquant's annotation dict of ``node`` (created on first use)."""
    return node.meta.setdefault(META, {})


class _HFForward(torch.nn.Module):
    """Calls a Hugging Face model with ``use_cache=False`` and returns a plain tensor.

    Causal LMs return their logits, encoders their last hidden state: the export then has one tensor
    input (``input_ids``) and one tensor output.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        config = getattr(self.model, "config", None)
        if config is not None and getattr(config, "is_decoder", True) is not False and hasattr(config, "use_cache"):
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        if isinstance(out, torch.Tensor):
            return out
        if getattr(out, "logits", None) is not None:
            return out.logits
        if getattr(out, "last_hidden_state", None) is not None:
            return out.last_hidden_state
        return out[0]


def is_hf_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


@dataclass
class CapturedGraph:
    """An exported model as an FX graph plus the tensors behind its parameter placeholders."""

    gm: fx.GraphModule
    #: placeholder name -> tensor (parameters, buffers and constants; shared with the model)
    tensors: dict[str, torch.Tensor]
    #: placeholder name -> the model's fully qualified name of that tensor
    fqn: dict[str, str]
    #: names of the user inputs, in call order
    user_inputs: list[str]
    model: torch.nn.Module | None = None
    model_class: str = ""
    meta: dict = field(default_factory=dict)

    # ---- running -------------------------------------------------------------------------------
    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        """Run the graph on user inputs (``input_ids`` for a Hugging Face model)."""
        if len(args) != len(self.user_inputs):
            raise TypeError(f"the captured graph takes {len(self.user_inputs)} input(s) "
                            f"({', '.join(self.user_inputs)}), got {len(args)}")
        feed = dict(zip(self.user_inputs, args))
        ordered = []
        for node in self.gm.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in feed:
                ordered.append(feed[node.name])
            elif node.name in self.tensors:
                ordered.append(self.tensors[node.name])
            else:
                raise CaptureError(f"placeholder {node.name!r} has no tensor and is not a user input",
                                   "a pass added a placeholder without registering it with add_tensor()")
        out = self.gm(*ordered)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    # ---- inspection ----------------------------------------------------------------------------
    def placeholder(self, name: str) -> fx.Node:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.name == name:
                return node
        raise KeyError(name)

    def tensor_of(self, node: fx.Node) -> torch.Tensor | None:
        """The tensor behind a parameter/buffer placeholder, else None."""
        if node.op == "placeholder":
            return self.tensors.get(node.name)
        return None

    def fqn_of(self, node: fx.Node) -> str | None:
        return self.fqn.get(node.name) if node.op == "placeholder" else None

    def add_tensor(self, name: str, tensor: torch.Tensor, fqn: str | None = None, before: fx.Node | None = None) -> fx.Node:
        """Add a new tensor placeholder (e.g. a trainable scale) and return its node."""
        graph = self.gm.graph
        if before is None:
            first_user = next(n for n in graph.nodes if n.op == "placeholder" and n.name in self.user_inputs)
            before = first_user
        with graph.inserting_before(before):
            node = graph.placeholder(name)
        node.meta["val"] = tensor
        self.tensors[node.name] = tensor
        if fqn is not None:
            self.fqn[node.name] = fqn
        return node

    def write_back(self) -> int:
        """Copy every (possibly rewritten) tensor into the model's parameter of the same name.

        Returns the number of tensors copied. Tensors that are the model's own objects need no copy.
        """
        if self.model is None:
            return 0
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(dict(self.model.named_buffers(remove_duplicate=False)))
        copied = 0
        for ph, name in self.fqn.items():
            tensor = self.tensors.get(ph)
            target = named.get(name)
            if tensor is None or target is None or tensor is target:
                continue
            with torch.no_grad():
                target.copy_(tensor.to(target.dtype))
            copied += 1
        return copied

    def parameter_nodes(self) -> dict[str, fx.Node]:
        """FQN -> placeholder node, for every parameter/buffer of the model."""
        out = {}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.name in self.fqn:
                out[self.fqn[node.name]] = node
        return out


def _example_input(model: torch.nn.Module, seq_len: int) -> torch.Tensor:
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 32) or 32)
    g = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.randint(0, vocab, (2, seq_len), generator=g).to(device)


def _max_positions(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 4:
            return value
    return 4096


def _failing_construct(exc: BaseException) -> str:
    """The innermost frame of the traceback that lies outside torch: the model code that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    user = [f for f in frames if not f.filename.startswith(torch_dir) and not f.filename.startswith(here)]
    if not user:
        return ""
    f = user[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def capture(model: torch.nn.Module, example_inputs: tuple | None = None, *, dynamic: bool = True,
            seq_len: int = 16) -> CapturedGraph:
    """Capture ``model`` to an FX graph with ``torch.export`` (non-strict, ``no_grad``).

    A Hugging Face model is wrapped to take ``input_ids`` and return logits (or the last hidden state),
    with a dynamic sequence length when ``dynamic``. Any other module is exported as it is, with
    ``example_inputs`` (required then).

    Raises :class:`CaptureError` naming the model class and the construct that failed.
    """
    model_class = type(model).__name__
    hf = is_hf_model(model)
    if hf:
        target: torch.nn.Module = _HFForward(model)
        prefix = "model."
        if example_inputs is None:
            example_inputs = (_example_input(model, seq_len),)
        dynamic_shapes = None
        if dynamic:
            max_len = max(_max_positions(model) - 1, seq_len + 1)
            dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096),
                               1: torch.export.Dim("seq_len", min=2, max=max_len)},)
    else:
        if example_inputs is None:
            raise CaptureError(f"cannot capture {model_class} without example inputs",
                               "pass example_inputs=(tensor, ...) for a model that is not a Hugging Face model")
        target = model
        prefix = ""
        dynamic_shapes = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(target, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the model and construct named
        where = _failing_construct(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CaptureError(
            f"torch.export could not capture {model_class}: {type(exc).__name__}: {first}"
            + (f"\n  failing construct: {where}" if where else ""),
            "simplify the forward (no data-dependent Python control flow, no untraceable calls), "
            "or capture with dynamic=False; run with FXQUANT_DEBUG=dir for the full trace",
        ) from exc
    finally:
        model.train(was_training)

    sig = ep.graph_signature
    state = ep.state_dict
    constants = getattr(ep, "constants", {})
    tensors: dict[str, torch.Tensor] = {}
    fqn: dict[str, str] = {}

    def strip(name: str) -> str:
        return name[len(prefix):] if prefix and name.startswith(prefix) else name

    for ph, name in sig.inputs_to_parameters.items():
        tensors[ph] = state[name]
        fqn[ph] = strip(name)
    for ph, name in sig.inputs_to_buffers.items():
        tensors[ph] = state[name] if name in state else constants[name]
        fqn[ph] = strip(name)
    for ph, name in getattr(sig, "inputs_to_lifted_tensor_constants", {}).items():
        tensors[ph] = constants[name]
    user_inputs = list(sig.user_inputs)
    gm = ep.graph_module
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in fqn:
            fxmeta(node)["param"] = fqn[node.name]
    return CapturedGraph(gm=gm, tensors=tensors, fqn=fqn, user_inputs=user_inputs, model=model,
                         model_class=model_class, meta={"dynamic": dynamic, "hf": hf})
