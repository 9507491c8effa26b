"""Where each architecture keeps its blocks and MLPs, as data.

An adapter names paths and keys; surgery code reads them and never branches on the architecture.
A model has one stack of blocks (decoders, encoders, ViT) or several (T5: encoder and decoder); each
stack has its own adapter, and `stacks_for` lists them with their paths resolved against a live model
or a state dict (BERT and ViT keep their blocks under `bert.` / `vit.` in the task-head classes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import torch.nn as nn

from upcycle.errors import UpcycleError


@dataclass(frozen=True)
class MLPAdapter:
    family: str
    model_types: tuple[str, ...]
    layers: str  # dotted path of the ModuleList of blocks, from the top model
    mlp: str  # attribute of a block that holds the MLP
    up: str  # projection names inside the MLP (nn.Linear modules)
    down: str
    gate: str | None  # None: not a gated MLP
    act_key: str  # config field naming the activation (transformers ACT2FN key)
    bias_key: str | None  # config field saying whether the MLP has biases (None: never)
    layers_key: str = "num_hidden_layers"
    hidden_key: str = "hidden_size"
    intermediate_key: str = "intermediate_size"
    # Encoders, ViT and encoder-decoders (the defaults describe the llama-like decoders above).
    causal: bool = True  # tokens see only earlier tokens: expert choice is refused in such a stack
    stack: str = ""  # name of the stack in a model with several ("encoder", "decoder"); "" when one
    bias: bool = False  # the MLP always has biases (BERT, ViT), whatever the config says
    base_prefix: str = ""  # attribute holding the base model in task-head classes ("bert", "vit"); `layers`
    # is then relative to the base model and `stacks_for` prepends "bert." where the model has it
    down_in_block: bool = False  # `down` is a path from the block, outside the MLP (BERT: intermediate.dense
    # + act is the MLP module, output.dense its down projection); surgery puts the MoE block in place of the
    # MLP module and an nn.Identity in place of `down`, so the block's own dropout/residual/LayerNorm stay
    gated_key: str | None = None  # config field saying whether the MLP is gated (T5's is_gated_act) ...
    gated_names: tuple[str, str] | None = None  # ... and then (gate, up) names replacing (gate=None, up)
    mask_module: str | None = None  # module (from the base model) whose forward gets this stack's padding
    mask_arg: str = "attention_mask"  # mask as `mask_arg`; "" for the base model itself; None: no padding
    inner_dropout_key: str | None = None  # config field of a dropout between the activation and `down` (T5's)
    # Attention, for BAM's attention experts and mixing (None: a family BAM and BTX do not mix).
    attn: str | None = None  # attribute of a block that holds the self-attention
    attn_proj: tuple[str, ...] = ()  # its projections (nn.Linear modules; q, k, v, o)
    attn_norms: tuple[str, ...] = ()  # its per-head norms where the family has them (q, k)

    def attn_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.attn}"

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def mlp_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.mlp}"

    def dense_key(self, i: int, proj: str, kind: str = "weight") -> str:
        if self.down_in_block and proj == self.down:
            return f"{self.layers}.{i}.{proj}.{kind}"
        return f"{self.mlp_prefix(i)}.{proj}.{kind}"

    def get_mlp(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.mlp)

    def set_mlp(self, block: nn.Module, module: nn.Module) -> None:
        """Put `module` (an MoE block) where the MLP was, in the block's train/eval mode; a down projection
        outside the MLP becomes identity."""
        _set_submodule(block, self.mlp, module.train(block.training))
        if self.down_in_block:
            _set_submodule(block, self.down, nn.Identity())

    def dense_up(self, block: nn.Module) -> nn.Linear:
        """The dense MLP's up projection (its dtype and device are the MoE block's)."""
        mlp = self.get_mlp(block)
        return mlp.get_submodule(self.up)

    def dense_mlp_state(self, block: nn.Module, i: int) -> dict:
        """The dense MLP's tensors of layer i under their state-dict keys (`dense_key`)."""
        out = {}
        for attr in ("gate", "up", "down"):
            proj = getattr(self, attr)
            if proj is None:
                continue
            mod = (
                block.get_submodule(proj)
                if (self.down_in_block and attr == "down")
                else self.get_mlp(block).get_submodule(proj)
            )
            for kind in ("weight", "bias"):
                t = getattr(mod, kind, None)
                if t is not None:
                    out[self.dense_key(i, proj, kind)] = t.detach()
        return out

    def has_bias(self, config: Any) -> bool:
        if self.bias:
            return True
        return bool(getattr(config, self.bias_key, False)) if self.bias_key else False

    def for_config(self, config: Any) -> "MLPAdapter":
        """This adapter with the MLP names of this config (T5: gated wi_0/wi_1 or plain wi)."""
        if self.gated_key and getattr(config, self.gated_key, False):
            return dataclasses.replace(self, gate=self.gated_names[0], up=self.gated_names[1])
        return self

    def with_base(self, prefixed: bool) -> "MLPAdapter":
        if not (prefixed and self.base_prefix):
            return self
        p = self.base_prefix + "."
        return dataclasses.replace(
            self,
            layers=p + self.layers,
            mask_module=None if self.mask_module is None else (p + self.mask_module).rstrip("."),
        )

    def dims(self, config: Any) -> tuple[int, int, int]:
        """(num_layers, hidden_size, intermediate_size) of a config."""
        return (
            getattr(config, self.layers_key),
            getattr(config, self.hidden_key),
            getattr(config, self.intermediate_key),
        )


LLAMA_LIKE = MLPAdapter(
    family="llama-like decoder",
    model_types=("llama", "mistral", "qwen2", "qwen3", "olmo2", "cohere"),
    layers="model.layers",
    mlp="mlp",
    up="up_proj",
    down="down_proj",
    gate="gate_proj",
    act_key="hidden_act",
    bias_key="mlp_bias",
    attn="self_attn",
    attn_proj=("q_proj", "k_proj", "v_proj", "o_proj"),
    attn_norms=("q_norm", "k_norm"),
)

BERT = MLPAdapter(
    family="BERT encoder",
    model_types=("bert",),
    causal=False,
    layers="encoder.layer",
    mlp="intermediate",
    up="dense",
    down="output.dense",
    gate=None,
    down_in_block=True,
    act_key="hidden_act",
    bias_key=None,
    bias=True,
    base_prefix="bert",
    mask_module="",
)

VIT = MLPAdapter(
    family="ViT encoder",
    model_types=("vit",),
    causal=False,
    layers="layers",
    mlp="mlp",
    up="fc1",
    down="fc2",
    gate=None,
    act_key="hidden_act",
    bias_key=None,
    bias=True,
    base_prefix="vit",  # no padding: every patch is real
)

_T5 = dict(
    model_types=("t5", "mt5"),
    up="wi",
    down="wo",
    gate=None,
    act_key="dense_act_fn",
    bias_key=None,
    hidden_key="d_model",
    intermediate_key="d_ff",
    gated_key="is_gated_act",
    gated_names=("wi_0", "wi_1"),
    inner_dropout_key="dropout_rate",
)
T5_ENCODER = MLPAdapter(
    family="T5 encoder",
    stack="encoder",
    causal=False,
    layers="encoder.block",
    mlp="layer.1.DenseReluDense",
    layers_key="num_layers",
    mask_module="encoder",
    **_T5,
)
T5_DECODER = MLPAdapter(
    family="T5 decoder",
    stack="decoder",
    causal=True,
    layers="decoder.block",
    mlp="layer.2.DenseReluDense",
    layers_key="num_decoder_layers",
    mask_module="decoder",
    **_T5,
)

ADAPTERS: tuple[MLPAdapter, ...] = (LLAMA_LIKE, BERT, VIT, T5_ENCODER, T5_DECODER)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for(config: Any, source: str = "config.json") -> MLPAdapter:
    model_type = getattr(config, "model_type", None)
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a.for_config(config)
    raise UpcycleError(
        f"{source}: model_type {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
    )


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def stacks_for(
    config: Any, model: nn.Module | None = None, keys: Iterable[str] | None = None, source: str = "config.json"
) -> list[MLPAdapter]:
    """The adapters of every stack of this model, paths resolved against `model` (a live model) or `keys`
    (state-dict keys); with neither, as declared. A stack the model lacks (T5EncoderModel's decoder) is
    left out."""
    first = adapter_for(config, source)
    found = [a.for_config(config) for a in ADAPTERS if getattr(config, "model_type", None) in a.model_types]
    assert found and found[0] == first
    if model is not None:
        base = getattr(model, "base_model", model)
        found = [a.with_base(base is not model) for a in found]
        out = [a for a in found if _has_module(model, a.layers)]
        if not out:
            raise UpcycleError(
                f"{type(model).__name__} has no {found[0].layers!r} module: the {first.family} "
                "adapter does not fit this class (a different transformers version?)"
            )
        return out
    if keys is not None:
        keys = list(keys)
        out = []
        for a in found:
            for cand in (a.with_base(False), a.with_base(True)):
                if any(k.startswith(cand.layers + ".") for k in keys):
                    out.append(cand)
                    break
        if not out:
            raise UpcycleError(f"{source}: no weights under {found[0].layers!r}: is this checkpoint a {first.family}?")
        return out
    return found


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
