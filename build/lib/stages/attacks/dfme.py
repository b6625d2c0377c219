"""Data-free model extraction (DFME, Truong et al., 2021): a generator proposes queries that maximise the
disagreement between surrogate and victim, the surrogate minimises it (L1 between logits), and the victim's
gradient is estimated by forward differences, so only queries are spent.

Victim logits are recovered from probabilities as centred log-probabilities. Per iteration: one generator step
(B images and B*m perturbed copies: B(m+1) queries) and `surrogate_steps` surrogate steps (B queries each). The
budget is spent in `--epochs` equal slices, the surrogate evaluated (and the attack checkpointed) after each.
`generator` is the image generator throughout; the thief's random numbers come from `thief.rng`.
"""

from __future__ import annotations

import torch

from models.generator import Generator
from models.params import Param
from stages.attacks._thief import Attack, Query, Thief, load_optimizer_state, optimizer_state


def logits_from_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """log p minus its mean over classes: the logits up to the constant softmax discards."""
    logp = probs.clamp_min(1e-8).log()
    return logp - logp.mean(1, keepdim=True)


def disagreement(surrogate_logits: torch.Tensor, victim: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 distance between centred logits."""
    s = surrogate_logits - surrogate_logits.mean(1, keepdim=True)
    return (s - victim).abs().sum(1)


class DFME(Attack):
    PARAMS = {
        "noise_dim": Param(100, 1, 4096, True, "generator input size"),
        "directions": Param(1, 1, 100, True, "m: random directions per forward-difference estimate"),
        "fd_eps": Param(1e-3, 1e-6, 1.0, False, "forward-difference step"),
        "surrogate_steps": Param(5, 1, 100, True, "surrogate steps per generator step"),
        "generator_lr": Param(5e-4, 0.0, 1.0, False, "Adam learning rate of the generator"),
        "width": Param(32, 4, 512, True, "generator channels (DFME: 64; 32 keeps CPU runs short)"),
    }
    POOL = "none"
    LABELS = ("soft",)  # the L1 logit loss and the gradient estimate need probabilities
    UINT8_QUERIES = False
    DEFAULT_EPOCHS = 20
    noise_dim: int
    directions: int
    fd_eps: float
    surrogate_steps: int
    generator_lr: float
    width: int

    def run(self, query: Query, thief: Thief) -> None:
        """Checkpoints after every budget slice: generator, both optimizers, the iteration, the last losses."""
        c, h, _ = thief.input_shape
        rng, device, b = thief.rng, thief.device, thief.recipe.batch_size
        state = thief.resume()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if state else int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
            generator = (
                Generator(self.noise_dim, c, h, self.width).to(device).train()
            )  # batch statistics throughout, as DFME
        g_opt = torch.optim.Adam(generator.parameters(), lr=self.generator_lr)
        s_opt = thief.optimizer()
        epochs, total, done, it = thief.recipe.epochs, query.remaining, 0, 0
        stats = {"train_loss": 0.0, "generator_loss": 0.0}
        if state:
            generator.load_state_dict(
                {k.removeprefix("generator."): v.to(device) for k, v in state.items() if k.startswith("generator.")}
            )
            load_optimizer_state(g_opt, state, "generator_optimizer")
            load_optimizer_state(s_opt, state, "optimizer")
            for group in s_opt.param_groups:
                group["lr"] = state["lr"]
            total, done, it = int(state["total"]), int(state["slices"]), int(state["iteration"])
            stats = {key: float(state[key]) for key in stats}
        iterations = -(-total // (b * (self.directions + 1 + self.surrogate_steps)))

        def end_slices() -> None:
            nonlocal done
            spent = total - query.remaining
            while done < epochs and spent >= -(-total * (done + 1) // epochs):  # end of a budget slice
                thief.end_epoch({**stats, "lr": s_opt.param_groups[0]["lr"]})
                done += 1
                thief.checkpoint(
                    {
                        **{f"generator.{k}": v for k, v in generator.state_dict().items()},
                        **optimizer_state(g_opt, "generator_optimizer"),
                        **optimizer_state(s_opt, "optimizer"),
                        "lr": s_opt.param_groups[0]["lr"],
                        "total": total,
                        "slices": done,
                        "iteration": it,
                        **stats,
                    }
                )

        end_slices()  # resumed between two slices that ended in the same iteration
        while query.remaining > 0:
            for group in s_opt.param_groups:
                group["lr"] = thief.recipe.lr_at(it, iterations)
            stats["generator_loss"] = self._generator_step(query, thief, generator, g_opt, b)
            for _ in range(self.surrogate_steps):
                if query.remaining <= 0:
                    break
                stats["train_loss"] = self._surrogate_step(query, thief, generator, s_opt, b)
            it += 1
            end_slices()

    def _noise(self, thief: Thief, n: int) -> torch.Tensor:
        return torch.randn(n, self.noise_dim, generator=thief.rng).to(thief.device)

    def _generator_step(self, query: Query, thief: Thief, generator, g_opt, b: int) -> float:
        """Ascend the disagreement: its gradient w.r.t. the images by forward differences, then back through G."""
        m, eps = self.directions, self.fd_eps
        x = generator(self._noise(thief, b))
        dim = x[0].numel()
        with torch.no_grad():
            u = torch.randn(b, m, dim, generator=thief.rng).to(x.device)
            u = u / u.norm(dim=2, keepdim=True)
            base = x.detach().unsqueeze(1)
            probes = (base + eps * u.view(b, m, *x.shape[1:])).clamp(0.0, 1.0)
            # per image: the image, then its m probes, so a budget cut leaves whole groups for the first images
            batch = torch.cat([base, probes], 1).flatten(0, 1)
            answers = query(batch)
            groups = len(answers) // (m + 1)
            if groups == 0:
                return 0.0
            answers = answers[: groups * (m + 1)].view(groups, m + 1, -1)
            surrogate = thief.surrogate.eval()
            s = surrogate(batch[: groups * (m + 1)]).view(groups, m + 1, -1)
            loss = disagreement(s.flatten(0, 1), logits_from_probabilities(answers.flatten(0, 1))).view(groups, m + 1)
            # gradient of the mean loss: d/m * sum_i (L(x + eps u_i) - L(x)) / eps * u_i, averaged over the batch
            coeff = (loss[:, 1:] - loss[:, :1]) / eps * (dim / m) / groups
            grad = (coeff.unsqueeze(2) * u[:groups]).sum(1).view(groups, *x.shape[1:])
        g_opt.zero_grad(set_to_none=True)
        x[:groups].backward(-grad)  # maximise the disagreement
        g_opt.step()
        return float(loss[:, 0].mean())

    def _surrogate_step(self, query: Query, thief: Thief, generator, s_opt, b: int) -> float:
        with torch.no_grad():
            x = generator(self._noise(thief, b))
            answers = query(x)
            x = x[: len(answers)]
        if len(x) < 2:  # one image cannot train BatchNorm
            return 0.0
        thief.surrogate.train()
        loss = disagreement(thief.surrogate(x), logits_from_probabilities(answers)).mean()
        s_opt.zero_grad(set_to_none=True)
        loss.backward()
        s_opt.step()
        thief.surrogate.eval()
        return float(loss.detach())
