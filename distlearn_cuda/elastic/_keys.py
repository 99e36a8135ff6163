"""The control store's keys, and the secret that names them.

A TCPStore has no authentication: any process that reaches its port can
read and write any key it can name. So every key of an elastic job lives
under a namespace derived from a secret that the control process and the
ranks share (``DISTLEARN_ELASTIC_SECRET``, or a file named by
``DISTLEARN_ELASTIC_SECRET_FILE``): a process without it finds neither the
Lighthouse's port nor any view's rendezvous, so it can neither join nor
read the job's keys. Only one key is public, ``CONTROL_KEY``, so that a
rank with the wrong secret is told so instead of waiting. The traffic is
not encrypted: on a network others can watch, reach the control process
through a tunnel (its default address is 127.0.0.1).

Jobs. A control process outlives its jobs: a job has a number (the
``job`` counter), and everything a job writes is under that number, so a
second job, or a job whose ranks all restarted after a total failure,
starts afresh on the same control process (see ``Membership.find_job``).
"""

from __future__ import annotations

import hashlib
import os
import secrets

__all__ = ["CONTROL_KEY", "SECRET_ENV", "SECRET_FILE_ENV", "JobKeys", "Keys", "read_secret"]

SECRET_ENV = "DISTLEARN_ELASTIC_SECRET"
SECRET_FILE_ENV = "DISTLEARN_ELASTIC_SECRET_FILE"
CONTROL_KEY = "distlearn/elastic/control"  # public: a control process listens here
# The shortest secret accepted, in characters (a generated one has 32 hex digits).
MIN_SECRET_CHARS = 16


def read_secret(environ: os._Environ[str] | dict[str, str] | None = None) -> str | None:
    """The shared secret from the environment (the variable, else the file
    it names), or None; ValueError when it is too short or the file unreadable."""
    environ = os.environ if environ is None else environ
    secret = environ.get(SECRET_ENV)
    if secret is None and SECRET_FILE_ENV in environ:
        path = environ[SECRET_FILE_ENV]
        try:
            with open(path) as file:
                secret = file.read().strip()
        except OSError as error:
            raise ValueError(f"{SECRET_FILE_ENV}={path}: cannot read it ({error})") from None
    if secret is not None and len(secret) < MIN_SECRET_CHARS:
        raise ValueError(
            f"the elastic secret ({SECRET_ENV} or {SECRET_FILE_ENV}) must have at least "
            f"{MIN_SECRET_CHARS} characters, got {len(secret)}"
        )
    return secret


def new_secret() -> str:
    return secrets.token_hex(16)


def missing_secret_message() -> str:
    return (
        f"elastic mode needs the control process's secret: set {SECRET_ENV} (or "
        f"{SECRET_FILE_ENV}, a file holding it) to the one the control process was given or "
        f"printed"
    )


class JobKeys:
    """The keys of one job (see the module)."""

    def __init__(self, root: str, job: int) -> None:
        self.job = job
        base = f"{root}/job-{job}"
        self.started = f"{base}/started"  # set once the job's first view trained
        self.alive = f"{base}/alive"  # a counter its members add to at each heartbeat
        self.joins = f"{base}/joins"  # joins announced, a counter
        self.admitted = f"{base}/admitted"  # joins admitted (by number), set by rank 0
        self.members = f"{base}/members"  # the view's members when joiners were admitted
        self._joiner = f"{base}/joiner"  # /<number>: the joiner's replica id
        self._requesting = f"{base}/requesting"  # /<replica id>: set before it asks
        self._view = f"{base}/view"

    def joiner(self, number: int) -> str:
        return f"{self._joiner}/{number}"

    def requesting(self, replica_id: str) -> str:
        return f"{self._requesting}/{replica_id}"

    def view(self, quorum_id: int, generation: int) -> str:
        return f"{self._view}-{quorum_id}-{generation}"


class Keys:
    """The keys under one secret's namespace."""

    def __init__(self, secret: str) -> None:
        digest = hashlib.sha256(b"distlearn_cuda elastic\0" + secret.encode()).hexdigest()
        self.root = f"distlearn/elastic/{digest[:40]}"
        self.lighthouse_port = f"{self.root}/lighthouse_port"
        self.timeouts = f"{self.root}/timeouts"  # "<join timeout s> <heartbeat timeout s>"
        self.started_at = f"{self.root}/started_at"  # the control process's start, time.time()
        self.job = f"{self.root}/job"  # the current job's number, a counter (0: none yet)

    def for_job(self, job: int) -> JobKeys:
        return JobKeys(self.root, job)
