"""The contribution ledger of a federated run: scores every round, logs it verifiably, pays out.

`Ledger` is the server's observer (`FederatedServer.observer`): after each round's aggregation it
receives what was combined (`ClosedRound`), stores the round (`ledger/rounds/rNNNN.safetensors`:
previous and new global model, the decoded update rows, their weights), leaves out what the
server rejected and what the robust rule itself dropped (its `coefficients`), scores the rest with
the configured method on the owner's validation set, and appends to the round log: `round`
(previous model hash, cohort), one `receipt` per update (in simulation signed with the client's
simulated key, derived from the seed: `roundlog.simulated_key`, marked `"client_key": "simulated"`;
in a deployment each client signs with its certificate's key, `"client_key": "certificate"`;
countersigned by the server either way),
`aggregate` (included, excluded with reasons, the stored round's and the new model's hashes),
`scores` (method, options, seed, permutations, fixed-point scores). The log opens with the
owner's commitments (`open`: validation-set hash, config hash, escrowed budget, the payout rule,
the server's public key; its random private key stays in `ledger/server_key.pem`) and `finish` closes it with the `payout` entry, `payouts.csv` and a bar chart.
`koinon verify RUN` replays all of it (`koinon.ledger.verify`).

A restarted run (`koinon server` on its state folder, `koinon run --resume`) passes `committed`
(the rounds its checkpoint holds): the log is reopened with the stored server key, its last
kept signed head checked, and cut back to those rounds (`RoundLog.reopen`); totals, samples
and exclusions are read back from the kept entries. Clients' receipt signatures are kept in
`ledger/attested/` until their round is logged, so uploads a restarted server takes back from
its state folder are still logged as the clients signed them.

Secure aggregation hides individual updates, and coalition scores need them: a run that uses it
must not attach a ledger (`refuse_hidden_updates`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from koinon.config import Config, LedgerConfig
from koinon.errors import ConfigError, KoinonError
from koinon.files import atomic_write_text
from koinon.ledger.certsign import CertificateKey
from koinon.ledger.contribution import (
    CONTRIBUTIONS,
    UTILITIES,
    ContributionMethod,
    RoundUpdates,
    Validation,
    one_thread,
)
from koinon.ledger.payout import Payout, split_budget
from koinon.ledger.roundlog import (
    RoundLog,
    canonical,
    load_server_key,
    new_server_key,
    public_hex,
    simulated_key,
)
from koinon.ledger.shapley import Budget
from koinon.local.losses import cross_entropy
from koinon.params import Layout
from koinon.topology.server import ClosedRound

CLIENT_KEYS = ("simulated", "server-attested", "certificate")
"""How receipts are signed: by each client's seed-derived simulated key (simulation), by the
server alone, or (`koinon server`) by each client with the key of its TLS certificate
(`koinon.ledger.certsign`), countersigned by the server."""

SCALE = 10**9
"""Scores are logged as integers in units of 1e-9 (fixed point: no float in the log)."""

FOLDER = "ledger"


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def fixed(value: float) -> int:
    return int(round(float(value) * SCALE))


@dataclass
class LedgerSettings:
    """`[ledger]`, checked."""

    contribution: str
    options: dict[str, Any]
    utility: str = "loss"
    validation_fraction: float = 0.5
    budget: Budget = field(default_factory=Budget)
    payout_cents: int = 0
    min_quality: str = "0.1"
    detect_fraction: float = 0.5
    min_update_norm: float = 0.01

    @staticmethod
    def from_config(c: LedgerConfig) -> LedgerSettings:
        CONTRIBUTIONS.get(c.contribution, key="ledger.contribution")
        for key in c.options:
            if key not in CONTRIBUTIONS.options(c.contribution):
                fixed_keys = [k for k in LedgerConfig.__dataclass_fields__ if k != "options"]
                allowed = fixed_keys + list(CONTRIBUTIONS.options(c.contribution))
                raise ConfigError(f"unknown key ledger.{key}; allowed: {', '.join(allowed)}")
        CONTRIBUTIONS.build(c.contribution, c.options, "ledger")  # checks the options' types and ranges
        if c.utility not in UTILITIES:
            raise ConfigError(f"ledger.utility = {c.utility!r}; allowed: {', '.join(UTILITIES)}")
        checks = (("validation_fraction", 0.0 < c.validation_fraction <= 1.0, "in (0, 1]"),
                  ("budget_s", c.budget_s >= 0, ">= 0"), ("budget_evals", c.budget_evals >= 0, ">= 0"),
                  ("payout_cents", c.payout_cents >= 0, ">= 0"), ("min_quality", c.min_quality >= 0, ">= 0"),
                  ("detect_fraction", 0.0 < c.detect_fraction <= 1.0, "in (0, 1]"),
                  ("min_update_norm", 0.0 <= c.min_update_norm < 1.0, "in [0, 1)"))
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"ledger.{key} = {getattr(c, key)!r}: must be {rule}")
        return LedgerSettings(c.contribution, dict(c.options), c.utility, c.validation_fraction,
                              Budget(c.budget_s, c.budget_evals), c.payout_cents, repr(c.min_quality),
                              c.detect_fraction, c.min_update_norm)


def refuse_hidden_updates(cfg: Config) -> None:
    """Coalition scores need each client's update; secure aggregation shows only their sum.
    Central DP adds noise to the aggregate that nobody may reproduce, so `koinon verify` could
    not replay it: both rule the ledger out (local and sample-level DP noise the updates
    themselves, before the wire, and the ledger logs and replays what arrived)."""
    if cfg.privacy.secagg:
        raise ConfigError("[ledger] contribution needs each client's update, which secure aggregation "
                          "hides: turn one of them off (ledger.contribution = 'none' or privacy.secagg = false)")
    if cfg.privacy.dp == "central":
        raise ConfigError("[ledger] contribution with privacy.dp = 'central': the aggregate's noise is "
                          "secret, so koinon verify cannot replay it; use privacy.dp = 'local' or 'sample'")


UNREPLAYED_HOOKS = {
    "server_delta": "corrects the aggregate with server state (FedDyn)",
    "start": "starts clients from other models than the global one",
    "starts": "starts clients from other models than the global one",
    "shared_mask": "shares only part of the model (personal layers)",
    "server_update_rows": "keeps several global models",
    "downlink_for": "sends each client its own model",
    "decode_update": "has its own update format",
    "server_rows": "transforms each update at the server (FedConv's learnt dilation)",
}
"""Client-algorithm hooks under which the applied model is not previous + lr x aggregate(rows),
the step that the contribution scores rebuild and `koinon verify` replays."""


def refuse_unreplayable(algorithm: Any, name: str) -> None:
    """The ledger's scores and `koinon verify` rebuild each round as the server optimizer's
    step from the previous model with the aggregate of the logged rows: a client algorithm
    (class or instance) with a hook that changes that is refused in one line. Every server
    optimizer is replayed (`koinon verify` rebuilds its state from the aggregates)."""
    for hook, why in UNREPLAYED_HOOKS.items():
        if hasattr(algorithm, hook):
            raise ConfigError(f"[ledger] with client.algorithm = {name!r}: it {why} ({hook}), so its model is "
                              "not the server's step with the aggregate and cannot be scored or verified; use an "
                              "algorithm without it (fedavg, fedprox, scaffold, ...)")


def stateful_optimizer(optimizer: Any) -> bool:
    """A server optimizer whose step is not x + lr x aggregate (momentum, adaptive moments)."""
    return optimizer is not None and str(getattr(optimizer, "name", "")) != "fedavg"


def validation_split(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The owner's validation set: a seeded `fraction` of the test split."""
    count = max(1, round(fraction * len(y)))
    index = np.sort(np.random.default_rng([seed, 0x7A11D]).choice(len(y), count, replace=False))
    picked = torch.as_tensor(index)
    return x[picked].contiguous(), y[picked].contiguous()


def validation_sha256(x: torch.Tensor, y: torch.Tensor) -> str:
    return hashlib.sha256(bytes.fromhex(tensor_sha256(x)) + bytes.fromhex(tensor_sha256(y.long()))).hexdigest()


class Ledger:
    """Scores, logs and pays a federated run; see the module docstring."""

    def __init__(self, settings: LedgerSettings, module: nn.Module, layout: Layout, x_val: torch.Tensor,
                 y_val: torch.Tensor, *, seed: int, folder: Path, num_clients: int, config_sha256: str,
                 num_classes: int = 0, loss_fn=cross_entropy, client_key: str = "simulated",
                 committed: int | None = None) -> None:
        if client_key not in CLIENT_KEYS:
            raise ValueError(f"client_key = {client_key!r}; allowed: {', '.join(CLIENT_KEYS)}")
        self.settings = settings
        self.method: ContributionMethod = CONTRIBUTIONS.build(settings.contribution, settings.options, "ledger")
        self.validation = Validation(module, layout, x_val, y_val, settings.utility, loss_fn,
                                     num_classes=num_classes or None)
        self.seed = seed
        self.folder = folder
        if committed is not None and not all((folder / f).is_file() for f in ("log.jsonl", "server_key.pem")):
            raise KoinonError(f"{folder}: no round log to continue ({committed} rounds are committed, but "
                              "log.jsonl or server_key.pem is missing); use a new run folder")
        (folder / "rounds").mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        if committed is None:  # a restart keeps the committed one (the open entry holds its hash)
            save_file({"x": x_val.contiguous(), "y": y_val.long().contiguous()},
                      str(folder / "validation.safetensors"))
        self.server_key = new_server_key(folder) if committed is None else load_server_key(folder)
        self.client_key = client_key
        self.client_keys = ([simulated_key(seed, "client", c) for c in range(num_clients)]
                            if client_key == "simulated" else [])
        self.attested: dict[tuple[int, int], dict[str, Any]] = {}  # (round, client) -> client's signature
        self.totals: dict[int, int] = {}
        self.sampled: dict[int, int] = {}
        self.excluded: dict[int, list[str]] = {}
        self.seconds = 0.0  # everything the ledger did in rounds (but the simulated clients' signing)
        self.client_s = 0.0  # the simulated clients signing their receipts (their own devices' work in a deployment)
        self.scoring_s = 0.0  # of which the contribution method
        self.evaluations = 0
        self.closed = False  # the payout entry is logged
        opening = {
            "type": "open", "validation_sha256": validation_sha256(x_val, y_val),
            "validation_size": len(y_val), "num_classes": num_classes, "config_sha256": config_sha256,
            "method": settings.contribution,
            "options_json": json.dumps(CONTRIBUTIONS.resolve(settings.contribution, settings.options),
                                       sort_keys=True),
            "utility": settings.utility, "seed": seed, "score_scale": SCALE,
            "budget_cents": settings.payout_cents, "min_quality": settings.min_quality,
            "detect_fraction": repr(settings.detect_fraction),
            "min_update_norm": repr(settings.min_update_norm), "rounding": "largest-remainder, integer cents",
            "server_key": public_hex(self.server_key),
            "client_key": client_key,
            **({"client_keys": {str(c): public_hex(k) for c, k in enumerate(self.client_keys)}}
               if self.client_keys else {}),
        }
        if committed is None:
            self.log = RoundLog(folder, self.server_key)
            self.log.append(opening)
        else:
            self.log = RoundLog.reopen(folder, self.server_key, lambda entries: self._standing(entries, committed))
            if {k: v for k, v in self.log.entries()[0].items() if k != "seq"} != opening:
                raise KoinonError(f"{folder}: the round log was opened with another configuration, validation "
                                  "set or keys than this run's (a run with a [ledger] continues only with the "
                                  "config it committed to); use a new run folder")
            self._replay_state(self.log.entries())

    # ------------------------------------------------------------------ restarts

    @staticmethod
    def _standing(entries: list[dict[str, Any]], committed: int) -> int:
        """How many of a restarted run's logged entries stand: everything of the `committed`
        rounds (the observer logs a round before the run commits it, so a crash in between
        leaves entries of a round that will be redone: they are dropped, and the redone round
        logs them once), and a payout logged after the last of them."""
        count = 1 if entries and entries[0].get("type") == "open" else 0
        rounds = 0
        for i, e in enumerate(entries[count:], start=count):
            if e.get("type") == "round":
                if e.get("round") != rounds + 1:
                    break
                rounds += 1
            if rounds > committed:
                break
            count = i + 1
        if rounds < committed:
            raise KoinonError(f"the round log holds {rounds} rounds but {committed} are committed: it lost "
                              "entries (the state folder is not this log's); cannot continue this run")
        return count

    def _replay_state(self, entries: list[dict[str, Any]]) -> None:
        """Totals, sampled rounds and exclusions as the standing entries leave them."""
        for e in entries:
            kind = e["type"]
            if kind == "round":
                for c in e["cohort"]:
                    self.sampled[c] = self.sampled.get(c, 0) + 1
                    self.totals.setdefault(c, 0)
            elif kind == "aggregate":
                for c, why in e["excluded"].items():
                    if why != "no update arrived":
                        self.excluded.setdefault(int(c), []).append(f"round {e['round']}: {why}")
            elif kind == "scores":
                for c, score in e["scores"].items():
                    self.totals[int(c)] = self.totals.get(int(c), 0) + int(score)
                self.evaluations += int(e["evaluations"])
            elif kind == "payout":
                self.closed = True
        stale = [p for p in (self.folder / "attested").glob("r*-c*.json")
                 if int(p.name[1:].split("-")[0]) <= sum(e["type"] == "round" for e in entries)]
        for path in stale:
            path.unlink()

    # ------------------------------------------------------------------ rounds

    def __call__(self, closed: ClosedRound) -> dict[str, float]:
        if self.closed:
            raise KoinonError(f"{self.folder}: the round log is closed by its payout entry; a run with a "
                              "[ledger] cannot go on past its last round")
        start, client_s = time.perf_counter(), self.client_s
        r = closed.round + 1
        excluded = dict(closed.excluded)
        keep = self._kept_by_rule(closed, excluded)
        clients = [c for i, c in enumerate(closed.clients) if keep[i]]
        rows, weights = closed.updates[keep], closed.weights[keep]
        name = f"rounds/r{r:04d}.safetensors"
        from safetensors.torch import save_file

        stateful = stateful_optimizer(closed.optimizer)
        state = closed.optimizer_state if stateful and closed.applied else None
        # A round that applied nothing has params == previous (one tensor: safetensors refuses shared memory).
        params = closed.params.clone() if closed.params is closed.previous else closed.params
        save_file({"previous": closed.previous.contiguous(), "params": params.contiguous(),
                   "updates": closed.updates.contiguous(), "weights": closed.weights.contiguous(),
                   "clients": torch.tensor(closed.clients, dtype=torch.long),
                   **{f"optimizer/{k}": v.contiguous() for k, v in (state or {}).items()}},
                  str(self.folder / name))
        cohort = sorted([*closed.clients, *closed.excluded])
        model = tensor_sha256(closed.previous)
        self.log.append({"type": "round", "round": r, "model_sha256": model, "cohort": cohort})
        for i, c in enumerate(closed.clients):
            self._receipt(r, c, model, closed.digests.get(c, ""), tensor_sha256(closed.updates[i]),
                          int(closed.weights[i]))
        for c in cohort:
            self.sampled[c] = self.sampled.get(c, 0) + 1
        if self.client_key == "certificate":  # earlier rounds are committed: their signatures are in the log
            for path in (self.folder / "attested").glob("r*-c*.json"):
                if int(path.name[1:].split("-")[0]) < r:
                    path.unlink(missing_ok=True)
        for c, why in excluded.items():
            if why != "no update arrived":
                self.excluded.setdefault(c, []).append(f"round {r}: {why}")
        self.log.append({
            "type": "aggregate", "round": r, "included": closed.clients, "scored": clients,
            "excluded": {str(c): why for c, why in sorted(excluded.items())}, "applied": closed.applied,
            "aggregator": str(getattr(closed.aggregator, "name", type(closed.aggregator).__name__)),
            "lr": repr(closed.lr), "round_file": name,
            "round_file_sha256": hashlib.sha256((self.folder / name).read_bytes()).hexdigest(),
            "model_sha256": tensor_sha256(closed.params),
        })
        metrics: dict[str, float] = {}
        if closed.applied and clients:
            data = RoundUpdates(closed.round, clients, closed.previous, rows, weights, closed.lr,
                                closed.optimizer if stateful else None, state)
            scoring = time.perf_counter()
            with one_thread():
                est = self.method.score(data, self.validation, self.seed, self.settings.budget)
            self.scoring_s += time.perf_counter() - scoring
            scores = {c: fixed(v) for c, v in zip(clients, est.values)}
            for c, s in scores.items():
                self.totals[c] = self.totals.get(c, 0) + s
            self.log.append({
                "type": "scores", "round": r, "method": self.settings.contribution, "seed": self.seed,
                "permutations": est.permutations, "evaluations": est.evaluations, "skipped": est.skipped,
                "scores": {str(c): s for c, s in scores.items()},
                "stderr": {str(c): fixed(e) for c, e in zip(clients, est.stderr)},
            })
            self.evaluations += est.evaluations
            metrics = {"ledger_evaluations": float(est.evaluations), "ledger_permutations": float(est.permutations),
                       **{f"score_{c}": float(v) for c, v in zip(clients, est.values)}}
        for c in cohort:  # a client scored nothing this round still has a total
            self.totals.setdefault(c, 0)
        elapsed = time.perf_counter() - start - (self.client_s - client_s)
        self.seconds += elapsed
        metrics["ledger_s"] = round(elapsed, 4)
        return metrics

    def _kept_by_rule(self, closed: ClosedRound, excluded: dict[int, str]) -> torch.Tensor:
        """Rows left to score: those the robust rule gave weight (its `coefficients`; all rows
        for rules that do not say, or whose pre-steps mixed the rows), less free riders (an
        update shorter than `min_update_norm` x the round's median update norm: the global
        model sent back, which would otherwise earn credit for diluting harmful updates)."""
        rule = closed.aggregator
        if getattr(rule, "steps", None) == []:
            rule = rule.final  # type: ignore[attr-defined]
        coefficients = getattr(rule, "coefficients", None)
        keep = torch.ones(len(closed.clients), dtype=torch.bool)
        if isinstance(coefficients, torch.Tensor) and coefficients.shape == (len(closed.clients),):
            keep = coefficients > 0
            name = getattr(rule, "name", "the aggregator")
            for i in (~keep).nonzero().flatten().tolist():
                excluded[closed.clients[i]] = f"dropped by {name}"
        if len(closed.clients):
            norms = torch.linalg.vector_norm(closed.updates.double(), dim=1)
            idle = norms <= self.settings.min_update_norm * norms.median()
            for i in (idle & keep).nonzero().flatten().tolist():
                excluded[closed.clients[i]] = (f"free rider: update norm {float(norms[i]):.3g} <= "
                                               f"{self.settings.min_update_norm} x the median")
            keep &= ~idle
        return keep

    def attest(self, round_number: int, client: int, cert: CertificateKey, model_sha256: str,
               num_samples: int, signature: bytes) -> None:
        """Record the client's signature of its receipt statement (`certsign.receipt_statement`),
        checked by the server, for the receipt logged when round `round_number` (1-based) closes."""
        attested = {
            "client_signature": signature.hex(), "client_certificate": cert.pem,
            "client_certificate_sha256": cert.sha256, "client_public_key": cert.public_key,
            "signed_model_sha256": model_sha256, "num_samples": int(num_samples)}
        self.attested[(round_number, client)] = attested
        # Kept on disk too: a restarted server takes the round's accepted uploads back from its
        # state folder, and their receipts still need the clients' signatures.
        (self.folder / "attested").mkdir(exist_ok=True)
        atomic_write_text(self._attested_path(round_number, client), json.dumps(attested, sort_keys=True))

    def _attested_path(self, round_number: int, client: int) -> Path:
        return self.folder / "attested" / f"r{round_number:04d}-c{client}.json"

    def _receipt(self, r: int, client: int, model: str, payload: str, update: str, weight: int) -> None:
        body = {"round": r, "client": client, "model_sha256": model, "payload_sha256": payload,
                "update_sha256": update, "weight": weight, "client_key": self.client_key}
        if self.client_keys:
            signing = time.perf_counter()
            body["client_signature"] = self.client_keys[client].sign(canonical(body)).hex()
            self.client_s += time.perf_counter() - signing
        elif self.client_key == "certificate":
            attested = self.attested.pop((r, client), None)
            path = self._attested_path(r, client)
            if attested is None and path.is_file():  # accepted before a restart
                attested = json.loads(path.read_text())
            body.update(attested or {})
        countersigned = self.server_key.sign(canonical(body)).hex()
        self.log.append({"type": "receipt", **body, "server_signature": countersigned})

    # ------------------------------------------------------------------ the end

    def flagged(self) -> dict[int, str]:
        """Clients excluded in at least `detect_fraction` of the rounds they were sampled in."""
        out = {}
        for c, reasons in self.excluded.items():
            if len(reasons) >= self.settings.detect_fraction * self.sampled.get(c, 1):
                out[c] = f"excluded in {len(reasons)} of {self.sampled.get(c, 1)} rounds; first {reasons[0]}"
        return out

    def finish(self, out: str | Path) -> Payout:
        """Log the payout, write `payouts.csv`, `payouts.png` and `ledger/summary.json`."""
        out = Path(out)
        flagged = self.flagged()
        payout = split_budget(self.settings.payout_cents, self.totals, flagged, self.settings.min_quality)
        entry = {
            "type": "payout", "budget_cents": self.settings.payout_cents,
            "totals": {str(c): s for c, s in sorted(self.totals.items())},
            "flagged": {str(c): why for c, why in sorted(flagged.items())},
            "paid": {str(c): v for c, v in sorted(payout.paid.items())},
            "unpaid": {str(c): why for c, why in sorted(payout.reasons.items())}, "refund": payout.refund,
        }
        if not self.closed:  # a run restarted after its payout was logged does not log it twice
            self.log.append(entry)
            self.closed = True
        elif {k: v for k, v in self.log.entries()[-1].items() if k != "seq"} != entry:
            raise KoinonError(f"{self.folder}: the logged payout is not the one its scores give")
        self.log.close()
        write_payouts(out, self.totals, payout)
        head = self.log.heads[-1]
        atomic_write_text(self.folder / "summary.json", json.dumps({
            "method": self.settings.contribution, "entries": head.size, "root": head.root,
            "server_key": public_hex(self.server_key), "ledger_s": round(self.seconds, 3),
            "scoring_s": round(self.scoring_s, 3), "simulated_client_signing_s": round(self.client_s, 3),
            "evaluations": self.evaluations, "refund_cents": payout.refund,
        }, indent=1))
        return payout


def write_payouts(out: Path, totals: dict[int, int], payout: Payout) -> None:
    with (out / "payouts.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["client", "score", "paid_cents", "reason_unpaid"])
        for c in sorted(totals):
            w.writerow([c, f"{totals[c] / SCALE:.9f}", payout.paid.get(c, 0), payout.reasons.get(c, "")])
    plot_payouts(totals, payout, out / "payouts.png")


def plot_payouts(totals: dict[int, int], payout: Payout, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = sorted(totals)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.18 * len(clients) + 2), 6), sharex=True)
    x = np.arange(len(clients))
    scores = [totals[c] / SCALE for c in clients]
    top.bar(x, scores, color=["tab:red" if c in payout.reasons else "tab:blue" for c in clients])
    top.axhline(0, color="black", linewidth=0.6)
    top.set_ylabel("total score")
    bottom.bar(x, [payout.paid.get(c, 0) / 100 for c in clients], color="tab:green")
    bottom.set_ylabel("paid")
    bottom.set_xlabel("client (red: paid nothing)")
    bottom.set_xticks(x, [str(c) for c in clients], rotation=90, fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def attach(federation: Any, out: str | Path, settings: LedgerSettings, *, config_text: str = "",
           client_key: str = "simulated", resume: bool = False) -> Ledger:
    """Watch `federation` (a `Federation`: its server, model, data and seed) with a ledger
    writing into the run folder `out`; call `finish(out)` after the last round. `client_key`:
    how receipts are signed (`CLIENT_KEYS`). `resume`: the federation was restored from a
    checkpoint of this run (`federation.round_index` rounds committed): the log in `out` is
    reopened, checked, and cut back to those rounds (`Ledger(committed=...)`)."""
    out = Path(out)
    server = federation.server
    refuse_unreplayable(server.algorithm, str(getattr(server.algorithm, "name", type(server.algorithm).__name__)))
    ds = federation.data.dataset
    x_val, y_val = validation_split(ds.x_test, ds.y_test, settings.validation_fraction, federation.seed)
    ledger = Ledger(settings, federation.model, federation.layout, x_val, y_val, seed=federation.seed,
                    folder=out / FOLDER, num_clients=federation.data.num_clients,
                    config_sha256=hashlib.sha256(config_text.encode()).hexdigest(), num_classes=ds.num_classes,
                    loss_fn=federation.loss_fn, client_key=client_key,
                    committed=int(federation.round_index) if resume else None)
    server.record_digests = True
    server.observer = ledger
    return ledger


def checked_settings(cfg: Config) -> LedgerSettings:
    """`cfg`'s `[ledger]`, checked against the rest of the config (one-line `ConfigError`)."""
    settings = LedgerSettings.from_config(cfg.ledger)
    refuse_hidden_updates(cfg)
    from koinon.clients import CLIENT_ALGORITHMS

    refuse_unreplayable(CLIENT_ALGORITHMS.get(cfg.client.algorithm, key="client.algorithm"), cfg.client.algorithm)
    if cfg.topology.name != "federated":
        raise ConfigError(f"[ledger] needs topology.name = 'federated' (a server that sees each update), "
                          f"not {cfg.topology.name!r}")
    if settings.contribution == "exact" and cfg.server.clients_per_round > 14:
        raise ConfigError(f"ledger.contribution = 'exact' evaluates 2^k coalitions; clients_per_round = "
                          f"{cfg.server.clients_per_round} is too many (at most 14; use gtg or tmc)")
    return settings


def attach_ledger(topology: Any, cfg: Config, out: Path, config_text: str,
                  client_key: str = "simulated", resume: bool = False) -> Ledger | None:
    """The ledger `cfg` asks for, watching `topology`'s server and writing into `out`; None
    when `ledger.contribution = "none"`. A deployment passes `client_key="certificate"`;
    `resume`: see `attach`."""
    if cfg.ledger.contribution == "none":
        return None
    return attach(topology, out, checked_settings(cfg), config_text=config_text, client_key=client_key,
                  resume=resume)
