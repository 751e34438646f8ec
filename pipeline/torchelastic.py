"""What a run started by torchrun should know about its agent: restarts that cannot reconnect."""

from __future__ import annotations

from collections.abc import Mapping

FRESH_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def restart_warning(env: Mapping[str, str]) -> str | None:
    """A warning when torchrun will restart the ranks but shares its rendezvous store with them.

    The shared store outlives a restart, so the restarted process group reads the previous round's rank
    addresses: the first restart fails ("Gloo connectFullMesh failed ... Connection refused") or hangs in
    NCCL's connect retries, using up a restart (pytorch/pytorch#167288). The agent decides this before
    any rank starts, so a rank can only say it; ``launch torchrun`` sets the variable."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return None
    if restarts <= 0 or env.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    if env.get(FRESH_STORE_ENV) == "1":  # the static rendezvous (--master-addr/--master-port) shares it anyway
        fix = "start torchrun with --rdzv-backend c10d --rdzv-endpoint HOST:PORT (python -m launch torchrun does)"
    else:
        fix = f"export {FRESH_STORE_ENV}=1 before torchrun (python -m launch torchrun does)"
    return (f"warning: torchrun --max-restarts={restarts} with its rendezvous store shared with the ranks: a "
            f"restart would read the last round's rank addresses and fail to connect; {fix}")
