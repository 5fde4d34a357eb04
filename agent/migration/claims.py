"""What this agent's jobs hold: one job per VM at a time, one job per job id."""

from __future__ import annotations

from agent.errors import UserError


class Claims:
    """Keys (a VM's name or QMP socket, a job id) held by running jobs."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}   # key -> job holding it

    def claim(self, key: str, job: str, what: str) -> None:
        """Take key for job, or refuse naming the job that holds it."""
        holder = self._held.get(key)
        if holder is not None and holder != job:
            raise UserError(f"{what} is busy with migration job {holder}")
        self._held[key] = job

    def release(self, job: str) -> None:
        """Everything job held."""
        for key in [k for k, j in self._held.items() if j == job]:
            del self._held[key]

    def holds(self, job: str) -> bool:
        return job in self._held.values()
