"""`koinon verify RUN`: replay a run's round log and check every hash, signature, aggregate and score.

Entry by entry, in order: the signed tree head after the entry (signature, size, the Merkle root
of the entries so far), the entry's canonical form and position, then what it claims:

- `open`: the validation set's and the config's hashes, well-formed keys; the server key is the
  pinned one (`server_key`, `koinon verify --server-key HEX`; unpinned, the report names the key
  it trusted: whoever holds a key can re-sign a whole log);
- `round`: the model it names is the one the previous aggregate produced (round 1: the model the
  config builds with the run's seed);
- `receipt`: the server's signature, and the client's where the log has client keys (simulated
  keys in simulation; in a deployment the client's ECDSA signature of its receipt statement with the
  public key of its recorded TLS certificate, and, given the run's CA (`--ca`), that the CA issued
  that certificate; server-attested receipts have the server's alone, and the report says so);
- `aggregate`: the stored round file's hash; its previous model, new model and update rows match
  the `round` entry, the receipts and the named model; the new model recomputed from the stored
  rows with the run's aggregator and server optimizer (stateless rules; stateful aggregators
  are checked by hash only, and the report says so; a stateful server optimizer, momentum or
  adaptive moments, is stepped from its initial state with every recomputed aggregate, and the
  state stored with each round must be the replayed one); which rows the rule dropped;
- `scores`: recomputed with the logged method, options, seed and permutation count (coalition
  models stepped by the server optimizer from its replayed state);
- `payout`: recomputed from the logged totals, exclusions and commitments.

Every `receipt`, `aggregate` and `scores` entry belongs to the current `round` (rounds follow on
from 1); a round has exactly one aggregate and, when that aggregate was applied and scored
clients, exactly one `scores` entry; a committed payout budget needs exactly one `payout` entry,
the last, and `payouts.csv` must say what it says. The first entry that fails is named and the
check stops there (exit code 1 from the CLI); a missing entry is named at the entry where it was
due (or after the last). Without the run's `config.toml` the scores and aggregates cannot be
replayed: the report is partial (`Report.partial`) and the CLI exits 1.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from koinon.config import load_config
from koinon.errors import KoinonError
from koinon.ledger import merkle
from koinon.ledger.certsign import (
    CertificateKey,
    issued_by,
    receipt_statement,
    verify_certificate_signature,
)
from koinon.ledger.contribution import CONTRIBUTIONS, RoundUpdates, Validation, one_thread
from koinon.ledger.ledger import FOLDER, SCALE, fixed, tensor_sha256, validation_sha256
from koinon.ledger.payout import split_budget
from koinon.ledger.roundlog import TreeHead, canonical, read_log, verify_signature
from koinon.ledger.shapley import Budget


class EntryFailure(Exception):
    """An entry that does not verify."""


@dataclass
class Report:
    entries: int = 0
    verified: int = 0
    failed_entry: int | None = None
    failure: str = ""
    notes: list[str] = field(default_factory=list)
    server_key: str = ""  # the server key the log names (and that verified its heads)
    pinned: bool = False  # whether it was checked against an expected key
    partial: str = ""  # what could not be checked (then the run is not fully verified)

    @property
    def ok(self) -> bool:
        return self.failed_entry is None


class _Replay:
    def __init__(self, run: Path, server_key: str | None = None, ca: bytes | None = None) -> None:
        self.run = run
        self.ca = ca
        self.pinned = server_key
        self.folder = run / FOLDER
        self.frontier = merkle.Frontier()
        self.open: dict[str, Any] = {}
        self.model: str | None = None  # hash of the current global model
        self.cohort: list[int] = []
        self.receipts: dict[int, dict[str, Any]] = {}
        self.rows: dict[int, tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, float,
                                  dict[str, torch.Tensor] | None]] = {}
        self.totals: dict[int, int] = {}
        self.sampled: dict[int, int] = {}
        self.excluded: dict[int, list[str]] = {}
        self.notes: list[str] = []
        self.cfg = load_config(run / "config.toml") if (run / "config.toml").is_file() else None
        self.validation: Validation | None = None
        self.aggregator: Any = None
        self.replayable = ""
        self.optimizer: Any = None  # a stateful server optimizer, replayed (`_replay_optimizer`)
        self.optimizer_state: dict[str, torch.Tensor] = {}
        self.partial = ""
        self.round = 0  # the current round entry's number
        self.aggregated = False  # the current round has its aggregate
        self.scores_due = False  # its aggregate was applied and scored clients: a scores entry is due
        self.paid = False

    # ------------------------------------------------------------------ per entry

    def check(self, index: int, line: bytes, head: TreeHead | None) -> str:
        self.frontier.append(merkle.leaf_hash(line))
        try:
            entry = json.loads(line)
        except ValueError:
            raise EntryFailure("not JSON") from None
        kind = entry.get("type", "?") if isinstance(entry, dict) else "?"
        label = f"{kind}" + "".join(f", {k} {entry[k]}" for k in ("round", "client") if k in entry)
        if index == 0:
            if kind != "open":
                raise EntryFailure(f"({label}) the log must open with the owner's commitments")
            self.open = entry
            if self.pinned is not None and str(entry.get("server_key", "")).lower() != self.pinned.lower():
                raise EntryFailure(f"(open) the log's server key {entry.get('server_key')} is not the "
                                   f"expected {self.pinned}")
        server_key = str(self.open.get("server_key", ""))
        if head is None:
            raise EntryFailure(f"({label}) no signed tree head covers it")
        if head.size != index + 1 or not head.verify(server_key):
            raise EntryFailure(f"({label}) its signed tree head does not verify")
        if bytes.fromhex(head.root) != self.frontier.root():
            raise EntryFailure(f"({label}) the Merkle root of the log so far differs from the signed one")
        try:
            if canonical(entry) != line:
                raise EntryFailure(f"({label}) not in canonical form")
        except TypeError as exc:
            raise EntryFailure(f"({label}) {exc}") from None
        if entry.get("seq") != index:
            raise EntryFailure(f"({label}) out of place: seq {entry.get('seq')} at position {index}")
        handler = getattr(self, f"_{kind}", None)
        if handler is None:
            raise EntryFailure(f"({label}) unknown entry type")
        if self.paid:
            raise EntryFailure(f"({label}) an entry after the payout, which closes the log")
        try:
            handler(entry)
        except EntryFailure as exc:
            raise EntryFailure(f"({label}) {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise EntryFailure(f"({label}) malformed: {exc!r}") from None
        return label

    def _open(self, e: dict[str, Any]) -> None:
        from safetensors.torch import load_file

        val = load_file(str(self.folder / "validation.safetensors"))
        if validation_sha256(val["x"], val["y"]) != e["validation_sha256"]:
            raise EntryFailure("the stored validation set is not the one committed to")
        if e["client_key"] == "simulated":
            self.notes.append("receipts are signed with simulated client keys (derived from the seed): "
                              "they check the log's plumbing, not the clients' identity")
        elif e["client_key"] == "server-attested":
            self.notes.append("receipts are server-attested only: clients did not sign them")
        elif e["client_key"] == "certificate":
            self.notes.append("receipts are signed by the clients with their TLS certificate keys"
                              + (" (certificates checked against the given CA)" if self.ca is not None else
                                 " (certificates not checked against a CA: pass --ca CA.pem)"))
        else:
            raise EntryFailure(f"unknown client_key {e['client_key']!r} (simulated, server-attested or certificate)")
        if self.cfg is None:
            self.partial = "no config.toml: the config hash, the aggregates and the scores were not replayed"
            return
        if hashlib.sha256((self.run / "config.toml").read_bytes()).hexdigest() != e["config_sha256"]:
            raise EntryFailure("config.toml is not the committed config")
        from koinon.models import build_model
        from koinon.params import Layout

        cfg = self.cfg
        module = build_model(cfg.model.name, cfg.model.options, tuple(val["x"].shape[1:]), e["num_classes"], cfg.seed)
        layout = Layout.from_module(module)
        self.validation = Validation(module, layout, val["x"], val["y"], e["utility"],
                                     num_classes=e["num_classes"] or None)
        self.model = tensor_sha256(layout.flatten(module))  # round 1 starts from the seeded model
        self._replay_rule()
        self._replay_optimizer(layout.flatten(module).detach())

    def _replay_rule(self) -> None:
        assert self.cfg is not None
        from koinon.aggregate import build_aggregator

        cfg = self.cfg
        options = dict(cfg.aggregator.options)
        f = options.pop("num_byzantine", round(cfg.attack.fraction * cfg.server.clients_per_round))
        rule = build_aggregator(cfg.aggregator.name, options, f)
        parts = [*getattr(rule, "steps", []), getattr(rule, "final", rule)]
        if any(hasattr(p, "state_dict") or hasattr(p, "set_reference") for p in parts):
            self.replayable = f"aggregator {cfg.aggregator.name!r} keeps state or a server reference"
        self.aggregator = rule
        if self.replayable:
            self.notes.append(f"aggregates checked by hash only: {self.replayable}")

    def _replay_optimizer(self, initial: torch.Tensor) -> None:
        """The run's server optimizer and its initial state: a stateful one (momentum, adaptive
        moments) is stepped here with every recomputed aggregate, so each round's new model and
        the state its scores start from are checked, not taken from the stored round."""
        assert self.cfg is not None
        from koinon.ledger.ledger import stateful_optimizer
        from koinon.server import SERVER_OPTIMIZERS

        s = self.cfg.server
        context: dict[str, Any] = {"momentum": s.momentum, "beta1": s.beta1, "beta2": s.beta2, "tau": s.tau}
        if s.lr:
            context["lr"] = s.lr
        optimizer = SERVER_OPTIMIZERS.build(s.optimizer, {}, "server.optimizer", **context)
        if stateful_optimizer(optimizer):
            self.optimizer = optimizer
            self.optimizer_state = optimizer.init(initial)
            if not self.replayable:
                self.notes.append(f"server optimizer {s.optimizer!r}: its state replayed from the aggregates")

    def _close_round(self) -> None:
        """What the current round still owes before the next round or the payout."""
        if self.round and not self.aggregated:
            raise EntryFailure(f"round {self.round} has no aggregate entry")
        if self.scores_due:
            raise EntryFailure(f"round {self.round}'s scores entry is missing")

    def _this_round(self, e: dict[str, Any]) -> None:
        if e["round"] != self.round:
            raise EntryFailure(f"belongs to round {e['round']}, but the current round is {self.round}")

    def finish(self) -> None:
        """What the whole log owes after its last entry."""
        if not self.paid:
            self._close_round()
            if int(self.open.get("budget_cents", 0)):
                raise EntryFailure(f"a payout budget of {self.open['budget_cents']} cents was committed "
                                   "but the log has no payout entry")

    def _round(self, e: dict[str, Any]) -> None:
        self._close_round()
        if e["round"] != self.round + 1:
            raise EntryFailure(f"round {e['round']} follows round {self.round}")
        self.round, self.aggregated, self.scores_due = e["round"], False, False
        if self.model is not None and e["model_sha256"] != self.model:
            raise EntryFailure("starts from a model that is not the previous round's result")
        self.model = e["model_sha256"]
        self.cohort = list(e["cohort"])
        self.receipts = {}
        for c in self.cohort:
            self.sampled[c] = self.sampled.get(c, 0) + 1

    def _receipt(self, e: dict[str, Any]) -> None:
        body = {k: e[k] for k in ("round", "client", "model_sha256", "payload_sha256", "update_sha256",
                                  "weight", "client_key")}
        if e["client_key"] != self.open["client_key"]:
            raise EntryFailure(f"client_key {e['client_key']!r}, the log opened with {self.open['client_key']!r}")
        if e["client_key"] == "simulated":
            key = self.open["client_keys"][str(e["client"])]
            if not verify_signature(key, e["client_signature"], canonical(body)):
                raise EntryFailure("the client's signature does not verify")
            body["client_signature"] = e["client_signature"]
        elif e["client_key"] == "certificate":
            body.update(self._certificate_signature(e))
        elif e["client_key"] != "server-attested" or "client_signature" in e:
            raise EntryFailure(f"unknown client_key {e['client_key']!r} (simulated, server-attested or certificate)")
        if not verify_signature(self.open["server_key"], e["server_signature"], canonical(body)):
            raise EntryFailure("the server's signature does not verify")
        self._this_round(e)
        if self.aggregated:
            raise EntryFailure("a receipt after the round's aggregate")
        if e["model_sha256"] != self.model or e["client"] not in self.cohort:
            raise EntryFailure("receipt for a model or a client this round did not have")
        if e["client"] in self.receipts:
            raise EntryFailure(f"a second receipt of client {e['client']} in round {self.round}")
        self.receipts[e["client"]] = e

    def _certificate_signature(self, e: dict[str, Any]) -> dict[str, Any]:
        """A deployed client's signature of its receipt statement, with its certificate's key."""
        fields = ("client_signature", "client_certificate", "client_certificate_sha256", "client_public_key",
                  "signed_model_sha256", "num_samples")
        missing = [k for k in fields if k not in e]
        if missing:
            raise EntryFailure(f"a certificate-signed receipt without {', '.join(missing)}")
        try:
            cert = CertificateKey.from_pem(e["client_certificate"])
        except ValueError as exc:
            raise EntryFailure(f"the recorded client certificate is unreadable: {exc}") from None
        if (cert.sha256, cert.public_key) != (e["client_certificate_sha256"], e["client_public_key"]):
            raise EntryFailure("the recorded fingerprint or public key is not the recorded certificate's")
        statement = receipt_statement(e["round"], e["signed_model_sha256"], e["payload_sha256"], e["num_samples"])
        if not verify_certificate_signature(e["client_public_key"], e["client_signature"], statement):
            raise EntryFailure("the client's signature does not verify with its certificate's public key")
        if self.ca is not None:
            why = issued_by(e["client_certificate"], self.ca)
            if why is not None:
                raise EntryFailure(why)
        return {k: e[k] for k in fields}

    def _aggregate(self, e: dict[str, Any]) -> None:
        from safetensors.torch import load_file

        self._this_round(e)
        if self.aggregated:
            raise EntryFailure(f"a second aggregate for round {self.round}")
        self.aggregated = True
        self.scores_due = bool(e["applied"]) and bool(e["scored"])
        path = self.folder / e["round_file"]
        if hashlib.sha256(path.read_bytes()).hexdigest() != e["round_file_sha256"]:
            raise EntryFailure(f"{e['round_file']} is not the stored round it names")
        t = load_file(str(path))
        clients = t["clients"].tolist()
        if clients != e["included"] or sorted(self.receipts) != sorted(clients):
            raise EntryFailure("included clients differ from the stored rows or the receipts")
        if tensor_sha256(t["previous"]) != self.model or tensor_sha256(t["params"]) != e["model_sha256"]:
            raise EntryFailure("the stored models are not the ones named")
        for i, c in enumerate(clients):
            r = self.receipts[c]
            if tensor_sha256(t["updates"][i]) != r["update_sha256"] or int(t["weights"][i]) != r["weight"]:
                raise EntryFailure(f"client {c}'s stored update is not the one its receipt names")
        excluded = {int(c): why for c, why in e["excluded"].items()}
        if set(excluded) | set(clients) != set(self.cohort) or set(e["scored"]) - set(clients):
            raise EntryFailure("included, excluded and scored clients do not add up to the cohort")
        stored_state = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("optimizer/")}
        state_before = None
        if self.optimizer is not None and e["applied"]:
            if self.replayable:  # the aggregate is not replayed, nor then the state: the stored one is used
                state_before = stored_state
            else:
                if sorted(stored_state) != sorted(self.optimizer_state) or any(
                        not torch.equal(stored_state[k], v) for k, v in self.optimizer_state.items()):
                    raise EntryFailure("the stored server optimizer state is not the one the earlier "
                                       "aggregates give")
                state_before = {k: v.clone() for k, v in self.optimizer_state.items()}
        elif stored_state:
            raise EntryFailure("the stored round holds server optimizer state the run does not have")
        if self.aggregator is not None and not self.replayable and clients:
            self._recompute(e, t, clients, excluded)
        if clients:
            norms = torch.linalg.vector_norm(t["updates"].double(), dim=1)
            idle = norms <= float(self.open["min_update_norm"]) * norms.median()
            expected = [c for i, c in enumerate(clients)
                        if not idle[i] and not excluded.get(c, "").startswith("dropped by")]
            if expected != e["scored"]:
                raise EntryFailure("the scored clients are not the included ones less those the rule "
                                   "dropped and the free riders")
        for c, why in excluded.items():
            if why != "no update arrived":
                self.excluded.setdefault(c, []).append(why)
        scored = [clients.index(c) for c in e["scored"]]
        self.rows[e["round"]] = (e["scored"], t["previous"], t["updates"][scored], t["weights"][scored],
                                 float(e["lr"]), state_before)
        self.model = e["model_sha256"]

    def _recompute(self, e: dict[str, Any], t: dict[str, torch.Tensor], clients: list[int],
                   excluded: dict[int, str]) -> None:
        lr = float(e["lr"])
        try:
            delta = self.aggregator.aggregate(t["updates"], t["weights"])
        except ValueError:
            new = t["previous"]
        else:
            if self.optimizer is None:
                new = t["previous"] + lr * delta
            elif e["applied"]:  # steps the replayed state (a refused step leaves it, as the server does)
                new = self.optimizer.step(t["previous"], delta, self.optimizer_state)
            else:
                new = t["previous"]
        if e["applied"] and not torch.equal(new, t["params"]):
            raise EntryFailure("the new model is not the aggregate of the stored updates")
        if not e["applied"] and not torch.equal(t["previous"], t["params"]):
            raise EntryFailure("a round whose aggregate was not applied changed the model")
        rule = getattr(self.aggregator, "final", self.aggregator)
        coefficients = getattr(rule, "coefficients", None)
        if not getattr(self.aggregator, "steps", []) and isinstance(coefficients, torch.Tensor):
            dropped = {clients[i] for i in (coefficients <= 0).nonzero().flatten().tolist()}
            if dropped != {c for c, why in excluded.items() if why.startswith("dropped by")}:
                raise EntryFailure("the rows the rule dropped are not the ones logged as dropped")

    def _scores(self, e: dict[str, Any]) -> None:
        self._this_round(e)
        if not self.scores_due:
            raise EntryFailure(f"a scores entry round {self.round} does not call for (a duplicate, before the "
                               "aggregate, or after one that was not applied or scored no one)")
        self.scores_due = False
        clients, previous, updates, weights, lr, state = self.rows[e["round"]]
        logged = {int(c): int(s) for c, s in e["scores"].items()}
        if sorted(logged) != sorted(clients):
            raise EntryFailure("scores a different set of clients than the aggregate scored")
        if e["method"] != self.open["method"] or e["seed"] != self.open["seed"]:
            raise EntryFailure("method or seed differ from the committed ones")
        for c, s in logged.items():
            self.totals[c] = self.totals.get(c, 0) + s
        if self.validation is None:
            return
        method = CONTRIBUTIONS.build(e["method"], json.loads(self.open["options_json"]), "ledger")
        budget = Budget(max_permutations=e["permutations"]) if e["permutations"] else Budget()
        with one_thread():
            est = method.score(RoundUpdates(e["round"] - 1, clients, previous, updates, weights, lr,
                                            self.optimizer, state), self.validation, e["seed"], budget)
        again = {c: fixed(v) for c, v in zip(clients, est.values)}
        if again != logged:
            worst = max(clients, key=lambda c: abs(again[c] - logged[c]))
            raise EntryFailure(f"recomputed scores differ (client {worst}: logged {logged[worst]}, "
                               f"recomputed {again[worst]})")

    def _payout(self, e: dict[str, Any]) -> None:
        self._close_round()
        self.paid = True
        for c in self.sampled:
            self.totals.setdefault(c, 0)
        if {int(c): int(s) for c, s in e["totals"].items()} != self.totals:
            raise EntryFailure("totals are not the sums of the logged scores")
        share = float(self.open["detect_fraction"])
        flagged = {c: "" for c, why in self.excluded.items() if len(why) >= share * self.sampled.get(c, 1)}
        if {int(c) for c in e["flagged"]} != set(flagged):
            raise EntryFailure("flagged attackers are not the ones the aggregates excluded")
        p = split_budget(self.open["budget_cents"], self.totals, flagged, self.open["min_quality"])
        if {int(c): int(v) for c, v in e["paid"].items()} != p.paid or e["refund"] != p.refund:
            raise EntryFailure("payouts are not the committed rule applied to the logged scores")
        path = self.run / "payouts.csv"
        if not path.is_file():
            raise EntryFailure("the run has no payouts.csv")
        expected = [["client", "score", "paid_cents", "reason_unpaid"]] + [
            [str(c), f"{self.totals[c] / SCALE:.9f}", str(e["paid"].get(str(c), 0)), str(e["unpaid"].get(str(c), ""))]
            for c in sorted(self.totals)]
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if rows != expected:
            row = next((i for i, (a, b) in enumerate(zip(rows, expected)) if a != b), min(len(rows), len(expected)))
            raise EntryFailure(f"payouts.csv differs from the payout entry (line {row + 1})")


def verify_run(run: str | Path, server_key: str | None = None, ca: bytes | None = None) -> Report:
    """Replay the round log of the run folder `run`; see the module docstring. `server_key`
    (hex): the expected server public key; without it the log's own key is trusted. `ca` (PEM):
    the run's CA, which must have issued the certificates of certificate-signed receipts."""
    run = Path(run)
    lines, heads = read_log(run / FOLDER)
    report = Report(entries=len(lines), pinned=server_key is not None)
    replay = _Replay(run, server_key, ca)
    for i, line in enumerate(lines):
        try:
            replay.check(i, line, heads[i] if i < len(heads) else None)
        except EntryFailure as exc:
            report.failed_entry, report.failure = i, str(exc)
            break
        except (OSError, KoinonError) as exc:
            report.failed_entry, report.failure = i, f"cannot be checked: {exc}"
            break
        report.verified += 1
    if report.ok:
        try:
            replay.finish()
        except EntryFailure as exc:
            report.failed_entry, report.failure = len(lines), f"(after the last entry) {exc}"
    if report.ok and len(heads) != len(lines):
        report.failed_entry, report.failure = len(lines), f"{len(heads)} signed heads for {len(lines)} entries"
    if report.ok:
        summary = run / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("model_sha256") != replay.model:
            report.failed_entry = len(lines) - 1
            report.failure = "the run's final model (summary.json) is not the last aggregate's"
    report.notes = replay.notes
    report.server_key = str(replay.open.get("server_key", ""))
    report.partial = replay.partial
    return report


def receipt_proof(run: str | Path, round_number: int, client: int) -> dict[str, Any]:
    """What `client` keeps and checks for its update of round `round_number` (1-based): its
    receipt entry, the signed head it was shown with it, the inclusion proof against that head,
    and the consistency proof from that head to the final one; `included` and `prefix` say
    whether both verify (`roundlog.verify_receipt`, `roundlog.verify_prefix`)."""
    from koinon.ledger.roundlog import verify_prefix, verify_receipt

    folder = Path(run) / FOLDER
    lines, heads = read_log(folder)
    entries = [json.loads(line) for line in lines]
    index = next((i for i, e in enumerate(entries) if e.get("type") == "receipt"
                  and e.get("round") == round_number and e.get("client") == client), None)
    if index is None or len(heads) != len(lines):
        raise KoinonError(f"{folder}: no receipt of client {client} in round {round_number}")
    leaves = [merkle.leaf_hash(line) for line in lines]
    seen, final = heads[index], heads[-1]
    inclusion = [h.hex() for h in merkle.inclusion_proof(index, leaves[: seen.size])]
    consistency = [h.hex() for h in merkle.consistency_proof(seen.size, leaves)]
    server = entries[0]["server_key"]
    return {"entry": index, "receipt": entries[index], "head": seen.__dict__, "inclusion_proof": inclusion,
            "final_head": final.__dict__, "consistency_proof": consistency,
            "included": verify_receipt(lines[index], index, seen, inclusion, server),
            "prefix": verify_prefix(seen, final, consistency, server)}
