"""pFedPG: client-specific prompt generation at the server (Yang et al. 2023,
https://arxiv.org/abs/2308.15367).

With a frozen pretrained backbone and prompt tuning (`model.peft = "prompt"` on the char
transformer: the model's layout is then the prompt and nothing else, so only prompts cross the
wire), each client adapts a prompt to its own data, and a generator at the server learns to
produce each client's prompt from what the clients' local optimization does:

1. the server keeps a generator G (a two-layer MLP, `hidden` units) and one learned embedding
   e_c per client (`embed_dim` values, seeded at first use); client c's prompt is the global
   prompt theta plus G(e_c), and the server sends G(e_c) to client c alone (a per-client
   download through the downlink codec, counted, like FedCAC's);
2. the client starts from theta + G(e_c), trains the prompt for the round's local steps on its
   data (the backbone frozen), keeps the result as its personal prompt (client state
   `personal`) and uploads the change Delta_c (the local optimization direction);
3. the server averages the changes into theta as FedAvg does, and moves the generator and the
   cohort's embeddings along each client's own direction: with D_c = Delta_c - the weighted mean
   change (the part theta does not already take), it takes one gradient step of size `gen_lr`
   on the cohort mean of -<G(e_c), D_c> with respect to G's weights and e_c (the hypernetwork
   update of pFedHN that pFedPG's generation stage follows: the generator output moves towards
   each client's locally optimized prompt).

Each client serves its personal prompt; a new client (no state) starts from theta and adapts it
on its data for `adapt_steps` steps (our choice: the paper gives a new client no embedding).
Where the paper leaves details open, our choices: the generator is an MLP on learned client
embeddings (the paper's attends over learnable client descriptors), its output an offset from
the global prompt, the update direction each client's deviation from the mean change. Any model
runs (the generator then produces offsets of all its trainable values); with prompt tuning it
is pFedPG. `koinon server` runs it: each task carries its client's offset (`TaskHeader.own`), and
the personal prompt stays in the client's `--state`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.personal.base import train_part
from koinon.seeding import generator
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer

_KEYS = ("gen_w1", "gen_b1", "gen_w2", "gen_b2")


@CLIENT_ALGORITHMS.register("pfedpg")
class PFedPG(LocalSGD):
    """Server-side generation of client-specific prompts (see the module docstring)."""

    name = "pfedpg"

    def __init__(self, embed_dim: int = 8, hidden: int = 16, gen_lr: float = 0.1, adapt_steps: int = 20,
                 seed: int = 0) -> None:
        for key, value in (("embed_dim", embed_dim), ("hidden", hidden), ("adapt_steps", adapt_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "adapt_steps" else 1):
                raise ValueError(f"client.{key} must be an integer >= {0 if key == 'adapt_steps' else 1}, got {value!r}")
        if not gen_lr > 0:
            raise ValueError(f"client.gen_lr must be > 0, got {gen_lr}")
        self.embed_dim, self.hidden, self.gen_lr = embed_dim, hidden, float(gen_lr)
        self.adapt_steps = adapt_steps
        self.seed = seed

    def init_server_state(self, numel: int) -> State:
        g = generator(self.seed, 0xF9D)
        # The output layer starts at zero: every generated prompt starts as the global prompt.
        return {"gen_w1": torch.randn(self.hidden, self.embed_dim, generator=g) / math.sqrt(self.embed_dim),
                "gen_b1": torch.zeros(self.hidden), "gen_w2": torch.zeros(numel, self.hidden),
                "gen_b2": torch.zeros(numel), "embeddings": torch.zeros(0, self.embed_dim)}

    def embedding(self, server_state: State, client: int) -> torch.Tensor:
        """Client `client`'s embedding: learned, or its seeded initial one before its first update."""
        table = server_state["embeddings"]
        if client < len(table) and bool(table[client].any()):
            return table[client]
        return torch.randn(self.embed_dim, generator=generator(self.seed, client, 0xE3B))

    @staticmethod
    def generate(weights: dict[str, torch.Tensor], e: torch.Tensor) -> torch.Tensor:
        """G(e): `[P]` (or `[K, P]` for `[K, d]` embeddings)."""
        h = torch.relu(e @ weights["gen_w1"].T + weights["gen_b1"])
        return h @ weights["gen_w2"].T + weights["gen_b2"]

    def downlink_for(self, server_state: State, client: int) -> State:
        return {"offset": self.generate(server_state, self.embedding(server_state, client))}

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        base = global_params.unsqueeze(0) if global_params.dim() == 1 else global_params
        starts = base.repeat(len(client_ids), 1) if base.shape[0] == 1 else base.clone()
        for i, st in enumerate(client_states):
            if "offset" in st:
                starts[i] = starts[i] + st["offset"].to(starts.dtype)
        result = trainer.run_steps(client_ids, starts, server_state, client_states, idx, steps, algorithm=LocalSGD())
        assert result.deltas is not None
        result.client_states = [{"personal": starts[i] + result.deltas[i]} for i in range(len(client_ids))]
        return result

    def server_update_rows(self, server_state: State, old: torch.Tensor, new: torch.Tensor,
                           rows: dict[str, torch.Tensor], weights: torch.Tensor, client_ids: list[int]) -> State:
        """Step 3 of the module docstring."""
        deltas = rows["model"].to(torch.float32)
        w = weights.to(deltas.dtype) / weights.to(deltas.dtype).sum()
        directions = deltas - (deltas * w.unsqueeze(1)).sum(0)
        params = {k: server_state[k].clone().requires_grad_(True) for k in _KEYS}
        emb = torch.stack([self.embedding(server_state, c) for c in client_ids]).requires_grad_(True)
        out = self.generate(params, emb)
        loss = -(out * directions).sum() / len(client_ids)
        grads = torch.autograd.grad(loss, [*params.values(), emb])
        state = dict(server_state)
        for k, g in zip(_KEYS, grads):
            state[k] = (params[k] - self.gen_lr * g).detach()
        table = server_state["embeddings"]
        size = max(len(table), max(client_ids) + 1)
        grown = torch.zeros(size, self.embed_dim)
        grown[: len(table)] = table
        grown[torch.as_tensor(client_ids)] = (emb - self.gen_lr * grads[-1]).detach()
        state["embeddings"] = grown
        return state

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        models = torch.stack([st.get("personal", global_params) for st in client_states])
        fresh = [i for i, st in enumerate(client_states) if "personal" not in st]
        if fresh and self.adapt_steps:
            models[fresh] = train_part(trainer, [client_ids[i] for i in fresh], global_params, self.adapt_steps,
                                       seed, round_index)
        return models
