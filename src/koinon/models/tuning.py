"""Parameter-efficient fine-tuning (`model.peft`): train, send and count only a small part.

FedPEFT (Sun et al. 2022, https://arxiv.org/abs/2210.01708) compares bias-only tuning, adapters,
LoRA and prompt tuning on a pretrained model in federated learning. Each method here takes the
built (and, with `model.init`, pretrained) model, adds its few trainable tensors, and turns
every frozen weight into a constant of the module: a plain tensor attribute, neither parameter
nor buffer. The model's `Layout` is then the trainable part only, so local training, codecs,
payload bytes, aggregation, server optimizers, checkpoints and the deployment all see that part
and nothing else (bytes are counted on it because it is all there is), and the frozen weights
cannot change. The frozen base comes from `model.init` on every machine, so it never crosses
the wire.

- `bias` (BitFit, Zaken et al. 2021, https://arxiv.org/abs/2106.10199): every bias;
- `lora` (Hu et al. 2021, https://arxiv.org/abs/2106.09685): the `peft` library's LoRA layers,
  injected into the target `nn.Linear` layers with `peft.inject_adapter_in_model`; they run
  under `torch.func.functional_call` and `vmap` unchanged, so both local runtimes use them;
- `adapter` (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751) and `prompt` (Lester et al.
  2021, https://arxiv.org/abs/2104.08691): written here, because `peft` has no bottleneck
  adapters, and its prompt tuning needs a Hugging Face `PreTrainedModel` (it edits the input
  embeddings of a `PeftModelForCausalLM`), not a plain `nn.Module` such as koinon's models.

Every method takes `train = [...]`: module names trained in full besides (e.g. the `head`).
Set it as a table, `model.peft = { name = "lora", rank = 4 }`, or a bare name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from koinon.errors import ConfigError
from koinon.models.charlm import CharTransformer
from koinon.registry import Registry

PEFT_METHODS: Registry[nn.Module] = Registry("peft method")
"""Factories are called as `factory(module=..., seed=..., **options)` and return the tuned module."""


def _is_linear(m: nn.Module, conv1d: bool) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight; peft's LoRA takes it.
    return isinstance(m, nn.Linear) or (conv1d and type(m).__name__ == "Conv1D")


def linear_targets(module: nn.Module, targets: list, conv1d: bool = False) -> list[str]:
    """The `nn.Linear` layers to adapt: `targets` (names, checked), or every one but the last
    (the output head) when empty."""
    linears = [n for n, m in module.named_modules() if _is_linear(m, conv1d)]
    if not targets:
        if len(linears) < 2:
            raise ValueError("the model has fewer than two nn.Linear layers; name the targets")
        return linears[:-1]
    unknown = [t for t in targets if t not in linears]
    if unknown:
        raise ValueError(f"targets {unknown} are not nn.Linear layers of the model; it has {', '.join(linears)}")
    return list(targets)


def _train_also(module: nn.Module, train: list) -> None:
    names = dict(module.named_modules())
    for name in train:
        if not isinstance(name, str) or name not in names:
            raise ValueError(f"train = {train!r}: {name!r} is not a module of the model")
        for p in names[name].parameters():
            p.requires_grad_(True)


def freeze_into_constants(module: nn.Module) -> nn.Module:
    """Every parameter with `requires_grad = False` becomes a plain tensor attribute of its
    module: outside the `Layout`, so it is neither trained, nor sent, nor averaged."""
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if p is not None and not p.requires_grad:
                del owner._parameters[name]
                object.__setattr__(owner, name, p.detach())
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("nothing is left to train")
    return module


def _freeze_all(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


@PEFT_METHODS.register("none")
def full(module: nn.Module, seed: int) -> nn.Module:
    """Full fine-tuning: every parameter is trained and sent (the reference)."""
    return module


@PEFT_METHODS.register("bias")
def bias_only(module: nn.Module, seed: int, train: list = []) -> nn.Module:  # noqa: B006
    """BitFit: only the biases (and the modules in `train`) are trained and sent."""
    for name, p in module.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    _train_also(module, train)
    return freeze_into_constants(module)


@PEFT_METHODS.register("lora")
def lora(module: nn.Module, seed: int, rank: int = 4, alpha: int = 8, targets: list = [],  # noqa: B006
         train: list = []) -> nn.Module:  # noqa: B006
    """LoRA through the `peft` library: W + (alpha / rank) B A on the target linear layers."""
    if rank < 1:
        raise ValueError(f"rank = {rank}: must be >= 1")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("model.peft = 'lora' needs the peft library: pip install 'koinon[finetune]'") from None
    names = linear_targets(module, targets, conv1d=True)
    _freeze_all(module)
    layers = dict(module.named_modules())
    transposed = all(type(layers[n]).__name__ == "Conv1D" for n in names)  # GPT-2 stores W transposed
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none",
                        fan_in_fan_out=transposed)
    with torch.random.fork_rng(devices=[]):  # LoRA's A is drawn from torch's global generator
        torch.manual_seed(seed)
        module = inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_(".lora_" in name)
    _train_also(module, train)
    return freeze_into_constants(module)


class Adapter(nn.Module):
    """A frozen linear layer followed by a residual bottleneck: y + up(gelu(down(y))).

    `up` starts at zero, so the adapted model starts as the pretrained one."""

    def __init__(self, base: nn.Linear, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.out_features, bottleneck)
        self.up = nn.Linear(bottleneck, base.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.up(F.gelu(self.down(y)))


@PEFT_METHODS.register("adapter")
def adapter(module: nn.Module, seed: int, bottleneck: int = 8, targets: list = [],  # noqa: B006
            train: list = []) -> nn.Module:  # noqa: B006
    """Bottleneck adapters (Houlsby) after the target linear layers; the rest is frozen."""
    if bottleneck < 1:
        raise ValueError(f"bottleneck = {bottleneck}: must be >= 1")
    names = linear_targets(module, targets)
    _freeze_all(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, leaf, Adapter(getattr(parent, leaf), bottleneck))
    _train_also(module, train)
    return freeze_into_constants(module)


class PromptTuned(nn.Module):
    """A character transformer with `tokens` learned input vectors in front of every sequence.

    The prompt attends and is attended to causally like text; its outputs are dropped, so the
    model's output keeps the shape `[batch, seq_len, vocab]`."""

    def __init__(self, base: CharTransformer, tokens: int, seed: int) -> None:
        super().__init__()
        self.base = base
        vocab = base.tok.weight.shape[0]
        # Initialised from the embeddings of random vocabulary entries, as Lester et al. found best.
        pick = torch.randint(vocab, (tokens,), generator=torch.Generator().manual_seed(seed))
        self.prompt = nn.Parameter(base.tok.weight.detach()[pick].clone())

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, n = self.base, self.prompt.shape[0]
        t = codes.shape[-1]
        x = b.tok(codes) + b.pos[:t]
        h = torch.cat([self.prompt.expand(*x.shape[:-2], n, x.shape[-1]), x], dim=-2)
        mask = torch.ones(n + t, n + t, dtype=torch.bool, device=codes.device).triu(1)
        for block in b.blocks:
            h = block(h, mask)
        return b.head(b.ln(h[..., n:, :]))


@PEFT_METHODS.register("prompt")
def prompt(module: nn.Module, seed: int, tokens: int = 8, train: list = []) -> nn.Module:  # noqa: B006
    """Prompt tuning: learned input vectors in front of every sequence (char_transformer only)."""
    if not isinstance(module, CharTransformer):
        raise ValueError(f"prompt tuning needs a model with token embeddings (char_transformer), not {type(module).__name__}")
    if tokens < 1:
        raise ValueError(f"tokens = {tokens}: must be >= 1")
    _freeze_all(module)
    tuned = PromptTuned(module, tokens, seed)
    _train_also(tuned.base, train)
    return freeze_into_constants(tuned)


class SupermaskLinear(nn.Module):
    """A linear layer with fixed random weights of which only the top `density` edges by score
    are used (edge-popup, Ramanujan et al. 2020, https://arxiv.org/abs/1911.13299): the scores
    are trained, through the straight-through estimator d(mask)/d(scores) = 1."""

    def __init__(self, base: nn.Linear, density: float, seed: int) -> None:
        super().__init__()
        self.weight = base.weight.detach()  # constants: neither trained nor sent
        self.bias = None if base.bias is None else base.bias.detach()
        self.keep = max(1, round(density * self.weight.numel()))
        order = torch.randperm(self.weight.numel(), generator=torch.Generator().manual_seed(seed))
        self.scores = nn.Parameter((order.float() / self.weight.numel()).view_as(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.scores.flatten()
        threshold = flat.kthvalue(flat.numel() - self.keep + 1).values
        hard = (self.scores >= threshold).to(self.scores.dtype)
        mask = hard.detach() + self.scores - self.scores.detach()
        return F.linear(x, self.weight * mask, self.bias)


@PEFT_METHODS.register("supermask")
def supermask(module: nn.Module, seed: int, density: float = 0.5, targets: list = []) -> nn.Module:  # noqa: B006
    """Supermasks: fixed random weights, trained edge scores (the model of FRL, client.algorithm = "frl")."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density = {density}: must be in (0, 1]")
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    names = linear_targets(module, targets) if targets else linears
    _freeze_all(module)
    for i, name in enumerate(names):
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, SupermaskLinear(getattr(parent, leaf), density, seed * 1009 + i))
    return freeze_into_constants(module)


def apply_peft(module: nn.Module, spec: object, seed: int) -> nn.Module:
    """`model.peft` (a method name or a table `{name = ..., options}`) applied to `module`."""
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        name, options = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise ConfigError(f"model.peft = {spec!r}: expected a method name ({', '.join(PEFT_METHODS.names())}) "
                          'or a table such as { name = "lora", rank = 4 }')
    PEFT_METHODS.get(name, key="model.peft")
    return PEFT_METHODS.build(name, options, "model.peft", module=module, seed=seed)
