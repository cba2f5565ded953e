"""Numerics shared by every algorithm: masked reductions, whitening, log-probs, KL estimators, GAE, EMA.

Each helper lives here once; losses and algorithms import them instead of re-deriving them.
Shapes: B = batch (sequences), T = response tokens, V = vocabulary. Masks are 0/1 (bool or float) and
mark the valid response tokens of right-padded rows.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum_i x_i * m_i over `dim` (all elements when None).

    x, mask: same shape (e.g. [B, T]). Positions with mask == 0 contribute exactly 0 even when x holds
    NaN or inf there (padding often carries -inf log-probs), because they are selected out, not multiplied.
    """
    selected = torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum(x * m) / max(sum(m), 1) over `dim` (all elements when None).

    The count is clamped to at least 1, so an all-masked row or batch yields 0 instead of NaN: a micro-batch
    with no valid tokens then adds nothing to the loss rather than poisoning it.
    """
    count = mask.sum() if dim is None else mask.sum(dim)
    # count in >= float32: bf16 holds integers exactly only up to 256
    count = count.to(torch.promote_types(x.dtype, torch.float32)).clamp(min=1)
    return (masked_sum(x, mask, dim) / count).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of the masked elements of the whole tensor: mean((x - mean)^2), times n/(n-1) when unbiased.

    Two-pass (centre first, then square) for accuracy. Returns a scalar tensor; 0 when fewer than 1
    (population) or 2 (unbiased) elements are valid.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum().to(x.dtype)
        var = var * count / (count - 1).clamp(min=1)
    return var


TIMEOUT_ENV = "RLHF_COLLECTIVE_TIMEOUT_S"


def collective_timeout() -> timedelta:
    """How long a rank waits in a collective for the others: $RLHF_COLLECTIVE_TIMEOUT_S seconds, default 30 min."""
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def all_reduce_sum_(t: Tensor) -> Tensor:
    """SUM all-reduce of `t` in place across ranks; a no-op in a single process. Returns `t`.

    A rank whose peer does not arrive gets an error from torch after the process group's timeout. gloo's
    all-reduce raises by itself. NCCL's returns at once and the rank would then block in its next host sync for
    good (torch's watchdog only logs the timeout, and TORCH_NCCL_BLOCKING_WAIT does not cover synchronous
    collectives in torch 2.11), so on GPUs the host waits for the result with `collective_timeout()` and torch
    raises DistBackendError."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if t.is_cuda:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True).wait(collective_timeout())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _masked_moments(x: Tensor, mask: Tensor, distributed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, population var, count) of the masked elements, global over ranks when `distributed`.

    Accumulated in float64 from (count, sum, sum of squares) so a single all-reduce gives every rank the
    statistics of the whole batch; float64 keeps the E[x^2] - E[x]^2 cancellation harmless.
    """
    m = (mask != 0).to(torch.float64)
    xd = torch.where(mask != 0, x.detach().to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    stats = torch.stack([m.sum(), xd.sum(), (xd * xd).sum()])
    if distributed:
        all_reduce_sum_(stats)
    count, total, total_sq = stats.unbind()
    n = count.clamp(min=1)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp(min=0)
    return mean, var, count


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-5, distributed: bool = False
) -> Tensor:
    """A_hat = (x - mean) * rsqrt(var + eps), with mean and population var over ALL masked elements.

    Paper (Xu et al. 2024, "Adv.Norm"): advantages are normalized over every response token of the whole
    rollout batch. With distributed=True count, sum and sum of squares are all-reduced first, so every rank
    divides by the same global statistics, exactly as if the batch sat on one process.
    shift_mean=False adds the mean back (scale only), the usual choice for reward whitening.
    The statistics are constants (no gradient flows through mean or var): they come from a collective.
    x, mask: [B, T] (any shape). Returns x's shape and dtype; 0 where mask == 0.
    """
    mean, var, _ = _masked_moments(x, mask, distributed)
    mean, rstd = mean.to(x.dtype), torch.rsqrt(var + eps).to(x.dtype)
    whitened = (x - mean) * rstd
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs and entropy from logits
# ---------------------------------------------------------------------------------------------------------------------


def _top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """-inf for every logit below the k-th largest of its row; ties with the k-th are kept (as in sampling)."""
    k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most-likely tokens whose probability reaches top_p.

    Sorting ascending, a token is dropped when the probability mass at or below it is <= 1 - top_p, i.e.
    when the tokens strictly more likely than it already reach top_p. This is the criterion the sampler
    uses, so the same tokens survive here and at generation time. The most likely token always survives.
    """
    ascending, order = torch.sort(logits, dim=-1, descending=False)
    mass_at_or_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_at_or_below <= 1.0 - top_p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _sampling_logits(logits: Tensor, temperature: float, top_k: int, top_p: float, upcast: bool) -> Tensor:
    """The logits the sampler draws from: / temperature, then top-k, then top-p (transformers' warper order)."""
    if upcast:
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        logits = _top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = _top_p_filter(logits, top_p)
    return logits


def logprobs_from_logits(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """log pi(y_t | s_t) = z_y - logsumexp(z), with z = filter(logits / temperature).

    The filter is the sampling one (top-k, then nucleus top-p, computed on the temperature-scaled
    distribution): PPO's ratio and KL must be measured on the distribution the rollouts were drawn from,
    otherwise even the first epoch has ratio != 1. top_k=0 and top_p=1.0 switch a filter off.
    logits [B, T, V], labels [B, T] (valid ids everywhere; callers mask afterwards) -> [B, T], float32 for
    half-precision logits (a bf16 log-prob would put ~0.4% noise on every PPO ratio), else logits' dtype.
    The label always stays in the support (the filter never removes it): it was sampled, so it cannot be
    impossible, yet a scoring pass whose rounding differs from the sampler's (bf16, a KV-cached step vs a
    full forward) can push it just past the top-k/top-p cut, which would give -inf and a NaN ratio.

    Memory: never materializes a full log_softmax. float32/float64 logits with no temperature or filter take
    one logsumexp + gather over the whole batch without copying logits; otherwise rows are processed one at
    a time so the extra [T, V] working copy exists for one row only.
    """
    if temperature <= 0 or top_k < 0 or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"need temperature > 0, top_k >= 0, 0 <= top_p <= 1; got {temperature}, {top_k}, {top_p}")
    upcast = logits.dtype in (torch.float16, torch.bfloat16)
    plain = temperature == 1.0 and top_k <= 0 and top_p >= 1.0

    def rows(z: Tensor, y: Tensor) -> Tensor:
        label = _sampling_logits(z, temperature, 0, 1.0, upcast).gather(-1, y.unsqueeze(-1))
        z = _sampling_logits(z, temperature, top_k, top_p, upcast).scatter(-1, y.unsqueeze(-1), label)
        return label.squeeze(-1) - torch.logsumexp(z, dim=-1)

    if plain and not upcast:
        return rows(logits, labels)
    return torch.stack([rows(z, y) for z, y in zip(logits, labels)])


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H(pi(. | s_t)) = logsumexp(z) - sum_v softmax(z)_v z_v, with z = logits / temperature.

    logits [B, T, V] -> [B, T] (float32 for half inputs). Row by row to bound the working memory.
    """

    def rows(z: Tensor) -> Tensor:
        z = _sampling_logits(z, temperature, 0, 1.0, z.dtype in (torch.float16, torch.bfloat16))
        return torch.logsumexp(z, dim=-1) - (z.softmax(dim=-1) * z).sum(dim=-1)

    return torch.stack([rows(z) for z in logits])


# ---------------------------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence"): per-token estimates of KL(pi || ref) from y ~ pi
# ---------------------------------------------------------------------------------------------------------------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi - log ref. Unbiased, high variance, can be negative per token."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (log pi - log ref)^2. Biased, low variance, >= 0."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(log ref - log pi) - 1 - (log ref - log pi). Unbiased and >= 0 (since e^u >= 1 + u)."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# ---------------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------------


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    next_values: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over right-padded responses.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma * lam * A_{t+1};  R_t = A_t + V(s_t).
    rewards, values, mask: [B, T]; values[:, t] = V(s_t), the value before token t is emitted.
    After the last valid token of a row, V(s_{t+1}) is next_values[b] ([B]; the bootstrap for a response cut
    at the length limit) or 0 (None, or the caller passes 0 for rows that ended with EOS), and A_{t+1} = 0.
    Returns (advantages [B, T], returns [B, T]); both are 0 wherever mask == 0, and padding never leaks
    into valid positions even if it holds NaN. Vectorized over B, one reverse pass over T.
    """
    valid = mask != 0
    B, T = rewards.shape
    zero = torch.zeros(B, dtype=values.dtype, device=values.device)
    bootstrap = zero if next_values is None else next_values.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_adv, next_valid = zero, torch.zeros(B, dtype=torch.bool, device=values.device)
    for t in reversed(range(T)):
        next_value = torch.where(next_valid, values[:, t + 1], bootstrap) if t + 1 < T else bootstrap
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * torch.where(next_valid, next_adv, zero)
        adv = torch.where(valid[:, t], adv, zero)
        advantages[:, t] = adv
        next_adv, next_valid = adv, valid[:, t]
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over masked tokens: 1 is a perfect critic, 0 no better than a constant.

    Scalar float tensor; NaN when Var[R] == 0 (undefined).
    """
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    return torch.where(var_returns > 0, 1 - var_residual / var_returns, torch.full_like(var_returns, math.nan))


# ---------------------------------------------------------------------------------------------------------------------
# Parameter EMA
# ---------------------------------------------------------------------------------------------------------------------

ParamsLike = Union[nn.Module, Iterable[Tensor]]


def _params(x: ParamsLike) -> list[Tensor]:
    return list(x.parameters()) if isinstance(x, nn.Module) else list(x)


@torch.no_grad()
def soft_update_(target: ParamsLike, source: ParamsLike, alpha: float) -> None:
    """theta_target <- alpha * theta_source + (1 - alpha) * theta_target, in place, parameter by parameter.

    The paper's reference EMA (theta_ref <- eta * theta_actor + (1 - eta) * theta_ref, eta = 0.001) and, with
    alpha = 1, an exact copy (TR-DPO hard sync). The source is cast to each target's dtype; note a bf16 target
    cannot hold increments much below 2^-8 of its magnitude, so tiny alphas want a float32 reference.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for tgt, src in zip(_params(target), _params(source), strict=True):
        if tgt.shape != src.shape:
            raise ValueError(f"shape mismatch in soft_update_: target {tuple(tgt.shape)} vs source {tuple(src.shape)}")
        src = src.to(device=tgt.device, dtype=tgt.dtype)
        if alpha == 1.0:
            tgt.copy_(src)
        else:
            tgt.lerp_(src, alpha)


# ---------------------------------------------------------------------------------------------------------------------
# Running statistics (value / reward normalization)
# ---------------------------------------------------------------------------------------------------------------------


class RunningMeanStd:
    """Running mean and variance of a scalar stream (e.g. returns, for value normalization).

    decay=None: exact statistics of everything seen, merged batch by batch (Chan et al. parallel update).
    decay=d: exponential moving averages of E[x] and E[x^2] with Adam-style debiasing (divide by 1 - d^n),
    var = E[x^2] - E[x]^2 -- the paper's value normalization uses d = 0.99995 and var_floor = 1e-2.
    var is clamped to >= var_floor; std = sqrt(var + eps). Before any update mean = 0 and var = 1 (identity).
    Statistics are kept as Python floats (float64), so state_dict() goes straight into JSON or a checkpoint.
    """

    def __init__(self, decay: Optional[float] = None, var_floor: float = 0.0, eps: float = 1e-5):
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1) or None, got {decay}")
        self.decay, self.var_floor, self.eps = decay, float(var_floor), float(eps)
        self.count = 0  # elements seen
        self._mean = 0.0  # exact mean, or EMA of E[x] (biased towards 0 until debiased)
        self._second = 0.0  # exact sum of squared deviations (M2), or EMA of E[x^2]
        self._debias = 0.0  # 1 - decay^updates, only used when decay is set

    @torch.no_grad()
    def update(self, x: Tensor, mask: Optional[Tensor] = None, distributed: bool = False) -> None:
        """Fold the (masked) elements of x into the statistics; with distributed=True the batch statistics are
        all-reduced first, so every rank keeps identical running statistics of the global batch."""
        mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
        batch_mean, batch_var, batch_count = torch.stack(_masked_moments(x, mask, distributed)).tolist()
        n = int(round(batch_count))
        if n == 0:
            return
        if self.decay is None:
            total = self.count + n
            delta = batch_mean - self._mean
            self._mean += delta * n / total
            self._second += batch_var * n + delta * delta * self.count * n / total
        else:
            d = self.decay
            self._mean = d * self._mean + (1 - d) * batch_mean
            self._second = d * self._second + (1 - d) * (batch_var + batch_mean * batch_mean)
            self._debias = d * self._debias + (1 - d)
        self.count += n

    @property
    def mean(self) -> float:
        if self.count == 0:
            return 0.0
        return self._mean if self.decay is None else self._mean / self._debias

    @property
    def var(self) -> float:
        if self.count == 0:
            return 1.0
        if self.decay is None:
            raw = self._second / self.count
        else:
            raw = self._second / self._debias - self.mean**2
        return max(raw, self.var_floor)

    @property
    def std(self) -> float:
        return math.sqrt(self.var + self.eps)

    def normalize(self, x: Tensor) -> Tensor:
        """(x - mean) / std."""
        return (x - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        """x * std + mean (inverse of normalize)."""
        return x * self.std + self.mean

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "var_floor": self.var_floor,
            "eps": self.eps,
            "count": self.count,
            "mean": self._mean,
            "second": self._second,
            "debias": self._debias,
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.var_floor, self.eps = state["decay"], state["var_floor"], state["eps"]
        self.count, self._mean = int(state["count"]), float(state["mean"])
        self._second, self._debias = float(state["second"]), float(state["debias"])


# ---------------------------------------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL penalty (Ziegler et al. 2019): e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * n_steps / horizon). Usual settings: target 6, horizon 10000 (init .15 in Ziegler/TRL);
    the paper leaves it off and uses a fixed beta of .1."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface (update is a no-op)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
