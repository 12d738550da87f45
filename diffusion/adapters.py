"""What of the backbone trains (the ``adapter`` config group): everything (``full``), nothing
(``frozen``; Textual Inversion trains an embedding alone), LoRA layers through peft (``lora``) or
ControlNets beside the fixed base (``controlnet``, diffusion.controlnet).

An adapter is applied to the freshly built backbone, before the EMA copy is made
(diffusion.training.module.DiffusionModule). With any adapter but ``full`` the backbone's base
weights are fixed: checkpoints leave them out and record their sha256 instead, which loading
compares, so a LoRA is never applied to other weights than it was trained on.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The linears LoRA adapts by default, per backbone class name: attention and MLP of our DiT (and of
#: our UNet's transformer blocks), the attention projections of diffusers' UNet (as diffusers' LoRA
#: scripts). Names match a module's full name or its dotted ending.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "DiT": ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "mlp.fc1", "mlp.fc2"),
    "UNet": ("attn.qkv", "attn.proj", "attn1.qkv", "attn1.proj", "attn2.q", "attn2.kv", "attn2.proj"),
    "DiffusersUNet": ("to_q", "to_k", "to_v", "to_out.0"),
    # diffusers' SD3 and FLUX LoRA scripts: both streams' attention projections (FLUX: and its MLPs).
    "SD3Transformer": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                       "attn.add_v_proj", "attn.to_add_out"),
    "FluxTransformer": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                        "ff_context.net.2"),
}
#: The wrapped diffusers models: backbone class -> (its diffusers model's attribute, the pipeline whose
#: save_lora_weights writes that model's LoRA, the keyword of its layers there).
DIFFUSERS_MODELS: dict[str, tuple[str, str, str]] = {
    "DiffusersUNet": ("unet", "StableDiffusionPipeline", "unet"),
    "SD3Transformer": ("transformer", "StableDiffusion3Pipeline", "transformer"),
    "FluxTransformer": ("transformer", "FluxPipeline", "transformer"),
}
#: What ``adaln=true`` adds: the linears that map the time/class embedding to adaLN's shift, scale, gate.
ADALN_TARGETS: dict[str, tuple[str, ...]] = {"DiT": ("adaLN_modulation.1",)}


#: The dtypes the fixed base weights of an adapter may be stored in (``adapter.base_dtype``).
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: The backbones that cast their inputs to their weights' dtype (and their output back), so that their
#: base weights may be stored in bf16: the wrapped diffusers models.
CASTING_BACKBONES = ("DiffusersUNet", "SD3Transformer", "FluxTransformer")


class Adapter:
    """Full fine-tuning; subclasses fix the base weights and say what trains instead."""

    name = "full"
    trains_base = True  # every backbone weight trains: checkpoints hold them all, as before adapters existed
    base: str | None = None  # a checkpoint of this project whose EMA backbone is the base (build_module)
    base_dtype: str = "float32"  # what the fixed base weights are stored in (Frozen, LoRA)

    def apply(self, backbone: nn.Module) -> nn.Module:
        """The backbone to train (changed in place)."""
        return backbone

    # What an adapter may train outside the backbone (Textual Inversion: new token rows of the conditioner).
    conditions_fixed = True  # a caption's encoding never changes in training, so it may be cached (cache_dir)

    def attach(self, conditioner: nn.Module) -> None:
        """Called by DiffusionModule with its conditioner: an adapter that trains a part of it adds it here."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups of what the adapter trains outside the backbone."""
        return []

    def write_outputs(self, module: nn.Module, directory: str | Path) -> list[Path]:
        """Files of what was trained, in another program's layout, at the end of training and by export.py."""
        return []


class Full(Adapter):
    """Every weight of the backbone trains (today's behaviour, bit for bit)."""


class Frozen(Adapter):
    """No weight of the backbone trains; ``base``: as :class:`LoRA`'s."""

    name = "frozen"
    trains_base = False

    def __init__(self, base: str | None = None, base_dtype: str = "float32") -> None:
        self.base = base
        self.base_dtype = _check_base_dtype(base_dtype)

    def apply(self, backbone: nn.Module) -> nn.Module:
        return cast_base(backbone.requires_grad_(False), self.base_dtype)


@dataclass
class LoRA(Adapter):
    """``W x + (alpha / rank) B A x`` on the ``targets`` linears (peft's LoRA layers); only A and B train.

    ``targets`` are module names or dotted endings of them (``to_q`` matches ``...attn1.to_q``); None
    takes :data:`DEFAULT_TARGETS` of the backbone's class, and ``adaln`` adds :data:`ADALN_TARGETS`.
    ``base``: a checkpoint of this project (a full training's, or convert.py's) whose EMA backbone
    weights are the base; None: the backbone as built (released weights, or the run's seeded init).
    ``base_dtype``: what the fixed base weights are stored in ("bfloat16" halves their memory, as
    diffusers' scripts' ``weight_dtype``); the LoRA weights, their gradients and the optimiser's state
    stay float32.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Sequence[str] | None = None
    adaln: bool = False
    base: str | None = None
    base_dtype: str = "float32"

    name = "lora"
    trains_base = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter.rank={self.rank!r}: the LoRA rank must be an integer >= 1 (4-64 are usual)")
        if not self.alpha > 0:
            raise ValueError(f"adapter.alpha={self.alpha!r}: must be > 0 (the update is scaled by alpha / rank)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"adapter.dropout={self.dropout!r}: must lie in [0, 1)")
        if isinstance(self.targets, str):
            raise ValueError(f"adapter.targets={self.targets!r}: give a list of module names, e.g. '[to_q,to_v]'")
        _check_base_dtype(self.base_dtype)

    def target_names(self, backbone: nn.Module) -> list[str]:
        """The full names of the modules LoRA wraps; a target that matches none is refused."""
        kind = type(backbone).__name__
        given = self.targets is not None  # the defaults cover variants (with or without cross-attention)
        targets = list(self.targets) if given else list(DEFAULT_TARGETS.get(kind, ()))
        if self.adaln:
            if kind not in ADALN_TARGETS:
                raise ValueError(f"adapter.adaln=true: {kind} has no adaLN linears known here; name them in "
                                 "adapter.targets instead")
            targets += ADALN_TARGETS[kind]
        if not targets:
            raise ValueError(f"adapter=lora has no default targets for backbone {kind}; set adapter.targets to "
                             f"some of its linears: {_show(_linear_names(backbone))}")
        names = [n for n, _ in backbone.named_modules() if n]
        matched, unmatched = set(), []
        for target in targets:
            hits = [n for n in names if n == target or n.endswith(f".{target}")]
            matched.update(hits)
            if not hits:
                unmatched.append(target)
        if (unmatched and given) or not matched:
            raise ValueError(f"adapter.targets {unmatched} match no module of {kind}; its linear modules are: "
                             f"{_show(_linear_names(backbone))}")
        return sorted(matched)

    def peft_config(self, backbone: nn.Module):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=float(self.alpha), lora_dropout=float(self.dropout),
                          target_modules=self.target_names(backbone), init_lora_weights=True)

    def apply(self, backbone: nn.Module) -> nn.Module:
        from peft import inject_adapter_in_model

        config = self.peft_config(backbone)
        backbone.requires_grad_(False)
        inject_adapter_in_model(config, backbone)
        for name, param in backbone.named_parameters():
            param.requires_grad_(".lora_" in name)
        return cast_base(backbone, self.base_dtype)


@dataclass
class ControlNet(Adapter):
    """ControlNet (Zhang et al. 2023): the base is fixed; ``num_controls`` ControlNets, trainable copies of
    its encoder with zero-initialised outputs (diffusion.controlnet.controlnet_for), are the only part
    that trains. The backbone becomes ``Controlled(base, controlnets, control_scale)``; its condition
    needs ``cond.control`` (B, num_controls, C, H, W), each in its ControlNet's ``input_space``.

    ``pretrained``: the ControlNet(s) to start from (one, or a list of num_controls, None for fresh
    ones): a diffusers ControlNetModel's hub id or directory for a DiffusersUNet (an SD3ControlNetModel's /
    FluxControlNetModel's for SD3 / FLUX; ``subfolder`` in a repository), a ``controlnet.safetensors`` of
    this project for our UNet / DiT.
    ``input_space``: "pixels" (the conditioning image in [-1, 1]; DiffusersControlNet maps it to
    diffusers' [0, 1]) or "latents" (the autoencoder's latents of it: our UNet's option, the DiT's only
    one); null: the ControlNet's own (pixels for the UNets, latents for the DiT). Each ControlNet says
    which in its ``input_space``, ``Controlled.input_spaces`` for all.
    ``pixels_per_latent``: the autoencoder's factor (1 in pixel space); null: the base's own (8 for a
    DiffusersUNet), else 1. ``num_blocks``: the DiT ControlNet's copied blocks, an SD3 / FLUX ControlNet's
    joint / double-stream ones (null: their defaults). ``latent_shift``: the autoencoder's shift_factor x
    scaling_factor, which a released InstantX SD3 ControlNet needs (diffusion.backbones.
    diffusers_mmdit_controlnet); unused by the others.
    ``control_scale``: the residuals' scale, one number or one per ControlNet; set it again at sampling
    with diffusion.controlnet.set_control_scale. ``base``, ``base_dtype``: as :class:`LoRA`'s.
    """

    num_controls: int = 1
    # Any: OmegaConf, which Hydra passes the adapter through, takes no unions of containers.
    pretrained: Any = None  # str | Sequence[str | None] | None
    subfolder: str | None = "controlnet"
    conditioning_channels: int = 3
    input_space: str | None = None
    pixels_per_latent: int | None = None
    num_blocks: int | None = None
    latent_shift: float | None = None
    control_scale: Any = 1.0  # float | Sequence[float]
    base: str | None = None
    base_dtype: str = "float32"

    name = "controlnet"
    trains_base = False

    def __post_init__(self) -> None:
        from diffusion._checks import check_choice

        if not isinstance(self.num_controls, int) or self.num_controls < 1:
            raise ValueError(f"adapter.num_controls={self.num_controls!r}: the number of ControlNets, an integer >= 1")
        check_choice("adapter.input_space", self.input_space, (None, "pixels", "latents"))
        self.pretrained_list()  # refused here when it does not give one per ControlNet
        _check_base_dtype(self.base_dtype)

    def pretrained_list(self) -> list[str | None]:
        given = self.pretrained
        if given is None or isinstance(given, str):
            return [given] * self.num_controls
        given = list(given)
        if len(given) != self.num_controls:
            raise ValueError(f"adapter.pretrained lists {len(given)} ControlNets for num_controls={self.num_controls}: "
                             "give one per ControlNet (null for a fresh one), or a single one for all")
        return given

    def apply(self, backbone: nn.Module) -> nn.Module:
        from diffusion.controlnet import Controlled, controlnet_for

        backbone.requires_grad_(False)
        nets = [controlnet_for(backbone, pretrained=p, subfolder=self.subfolder,
                               conditioning_channels=self.conditioning_channels, input_space=self.input_space,
                               pixels_per_latent=self.pixels_per_latent, num_blocks=self.num_blocks,
                               latent_shift=self.latent_shift)
                for p in self.pretrained_list()]  # float32 copies of the base, before it is cast
        return Controlled(cast_base(backbone, self.base_dtype), nets, self.control_scale)

    def write_outputs(self, module: nn.Module, directory: str | Path) -> list[Path]:
        """The EMA ControlNets: ``controlnet/`` (``controlnet_{k}/`` for several) in diffusers' layout, which
        ``ControlNetModel.from_pretrained`` reads, for a DiffusersUNet (SD3ControlNetModel's /
        FluxControlNetModel's for SD3 / FLUX); ``controlnet.safetensors``
        (``controlnet_{k}.safetensors``), the state dict that ``adapter.pretrained`` reads, for ours."""
        return save_controlnets(getattr(getattr(module, "ema", None), "module", module), directory)


def save_controlnets(backbone: nn.Module, directory: str | Path) -> list[Path]:
    """Write the ControlNets of a Controlled ``backbone`` (see :meth:`ControlNet.write_outputs`)."""
    from safetensors.torch import save_file

    from diffusion.controlnet import Controlled

    if not isinstance(backbone, Controlled):
        raise ValueError(f"the backbone ({type(backbone).__name__}) holds no ControlNet (adapter=controlnet)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    many = len(backbone.controlnets) > 1
    written = []
    for k, net in enumerate(backbone.controlnets):
        stem = f"controlnet_{k}" if many else "controlnet"
        if hasattr(net, "save_pretrained"):  # diffusers' ControlNetModel
            written.append(net.save_pretrained(directory / stem))
        else:
            path = directory / f"{stem}.safetensors"
            save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, path,
                      metadata={"controlnet": type(net).__name__, "input_space": net.input_space})
            written.append(path)
    return written


def _check_base_dtype(base_dtype: str) -> str:
    from diffusion._checks import check_choice

    return check_choice("adapter.base_dtype", base_dtype, tuple(BASE_DTYPES))


def cast_base(backbone: nn.Module, base_dtype: str) -> nn.Module:
    """Store ``backbone``'s fixed weights (those that do not train) and its floating buffers in
    ``base_dtype``; the trainable ones stay as they are (float32). In place; returns the backbone.
    Only backbones that cast their inputs to their weights' dtype (:data:`CASTING_BACKBONES`) take bf16."""
    dtype = BASE_DTYPES[_check_base_dtype(base_dtype)]
    if dtype == torch.float32:
        return backbone
    kind = type(backbone).__name__
    if kind not in CASTING_BACKBONES:
        raise ValueError(f"adapter.base_dtype={base_dtype}: {kind} computes in its inputs' dtype (float32), so its "
                         f"base weights stay float32; bf16 base weights are for the wrapped diffusers models "
                         f"({', '.join(CASTING_BACKBONES)}). Use adapter.base_dtype=float32, or precision=bf16 "
                         "(autocast) for speed")
    for param in backbone.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    for module in backbone.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))
    return backbone


def _linear_names(model: nn.Module) -> list[str]:
    """The names of the layers peft's LoRA can wrap (linears and convolutions)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def _show(names: list[str], limit: int = 40) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def base_parameter_names(backbone: nn.Module) -> list[str]:
    """The backbone's parameters that do not train: its fixed base weights."""
    return [n for n, p in backbone.named_parameters() if not p.requires_grad]


def merged(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` with its LoRA layers merged into their base weights (``W + (alpha / r) B A``)
    and removed: the plain backbone, whose state_dict has the names of one built without an adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(backbone)
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``model`` in peft's saved layout (``...to_q.lora_A.weight``, adapter name dropped)."""
    pattern = re.compile(r"\.(lora_[AB])\.default\.")
    return {pattern.sub(r".\1.", k): v.detach().contiguous() for k, v in model.state_dict().items()
            if pattern.search(k)}


def diffusers_model(backbone: nn.Module) -> tuple[str, nn.Module] | None:
    """(subfolder name, model) of a wrapped diffusers model (``unet``, ``transformer``); None for ours."""
    known = DIFFUSERS_MODELS.get(type(backbone).__name__)
    return None if known is None else (known[0], getattr(backbone, known[0]))


def save_diffusers_lora(backbone: nn.Module, adapter: LoRA, directory: str | Path) -> Path:
    """``pytorch_lora_weights.safetensors`` of a LoRA-adapted wrapped diffusers model (SD 1.x/2.x/XL's
    UNet, SD3's or FLUX's transformer) in diffusers' layout, which the pipeline's ``load_lora_weights``
    loads; rank, alpha and targets go in its metadata, so that diffusers scales by the real alpha / rank."""
    import diffusers

    kind = type(backbone).__name__
    if kind not in DIFFUSERS_MODELS:
        raise ValueError(f"pytorch_lora_weights.safetensors is written for a wrapped diffusers model "
                         f"(backbone={', '.join(('sd15_unet', 'sdxl_unet', 'sd3_transformer', 'flux_transformer'))}), "
                         f"not {kind}")
    attribute, pipeline, keyword = DIFFUSERS_MODELS[kind]
    state = lora_state_dict(getattr(backbone, attribute))
    if not state:
        raise ValueError("the backbone carries no LoRA layers (adapter=lora)")
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    metadata: dict[str, Any] = {"r": adapter.rank, "lora_alpha": float(adapter.alpha), "target_modules": targets,
                                "lora_dropout": float(adapter.dropout)}
    directory = Path(directory)
    getattr(diffusers, pipeline).save_lora_weights(directory, safe_serialization=True, **{
        f"{keyword}_lora_layers": state, f"{keyword}_lora_adapter_metadata": metadata})
    return directory / "pytorch_lora_weights.safetensors"


#: The prefix of a UNet LoRA module's keys in kohya's layout (ComfyUI's and sd-scripts' name for the UNet).
KOHYA_UNET_PREFIX = "lora_unet_"


def kohya_lora_state_dict(backbone: nn.Module, adapter: LoRA) -> dict[str, torch.Tensor]:
    """The LoRA of a DiffusersUNet in kohya's layout, diffusers-named: per adapted module of the UNet
    (its dotted path with the dots as underscores, after ``lora_unet_``) ``.lora_down.weight`` (peft's
    A), ``.lora_up.weight`` (B) and ``.alpha``, a scalar holding the real alpha: loaders scale the update
    by alpha / rank, the rank read off lora_down's rows."""
    unet = getattr(backbone, "unet", None)
    if type(backbone).__name__ != "DiffusersUNet" or unet is None:
        raise ValueError(f"a kohya LoRA file is written for a diffusers UNet backbone (backbone=sd15_unet, sd21_unet, "
                         f"sdxl_unet), not {type(backbone).__name__}")
    names = {"lora_A": "lora_down", "lora_B": "lora_up"}
    state: dict[str, torch.Tensor] = {}
    for key, value in lora_state_dict(unet).items():
        path, _, rest = key.partition(".lora_")
        part = names[f"lora_{rest.split('.', 1)[0]}"]
        module = KOHYA_UNET_PREFIX + path.replace(".", "_")
        state[f"{module}.{part}.weight"] = value
        state[f"{module}.alpha"] = torch.tensor(float(adapter.alpha))
    if not state:
        raise ValueError("the backbone carries no LoRA layers (adapter=lora)")
    return state


def save_kohya_lora(backbone: nn.Module, adapter: LoRA, file: str | Path) -> Path:
    """The LoRA of a DiffusersUNet as one kohya-layout ``.safetensors`` file (:func:`kohya_lora_state_dict`),
    which ComfyUI's LoRA loader and diffusers' ``load_lora_weights`` read; rank and alpha also go in
    sd-scripts' metadata keys."""
    from safetensors.torch import save_file

    file = Path(file)
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: a kohya LoRA file is a .safetensors file; name it <something>.safetensors")
    state = kohya_lora_state_dict(backbone, adapter)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, file, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(adapter.rank),
                                     "ss_network_alpha": f"{float(adapter.alpha):g}"})
    return file


def load_base(backbone: nn.Module, adapter: Adapter, read_checkpoint) -> None:
    """Load the EMA backbone weights of ``adapter.base`` (a checkpoint read by ``read_checkpoint``) into
    ``backbone``: the weights the adapter is trained on. A checkpoint that holds no whole backbone (an
    adapter's own) is refused."""
    checkpoint = read_checkpoint(adapter.base)
    if checkpoint.get("adapter") is not None:
        raise ValueError(f"adapter.base={adapter.base} holds an adapter={checkpoint['adapter']['name']}, not whole "
                         "weights; export.py merges a LoRA into its base: start from a full training's checkpoint")
    prefix = "ema.module."
    weights = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"adapter.base={adapter.base} holds another backbone than this run's: "
                         f"{str(e).splitlines()[0]} (use the backbone options it was trained with)") from e
