"""Who may do what: the roles of enrolled keys, and the people who submit jobs.

Every key the coordinator knows has a name and a role. An ``agent`` key is a node. An ``admin`` runs the pool:
everything a client can do. A ``user`` (a researcher an admin added with `coordinator user add`) submits and
watches jobs, sees everyone's, and changes only their own. The requests of the protocol say who may send them
(conode/cluster/protocol.py): ``client`` requests any admin or user, ``admin`` requests admins only.
Pure: decided from names and roles, never from the store or a socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from conode import shell

ADMIN, USER, AGENT = "admin", "user", "agent"
CLIENT = "client"  # a request either kind of person may send
MAX_USER_NAME = 32
_USER_NAME = re.compile(r"[a-z][a-z0-9._-]*")


@dataclass(frozen=True)
class Requester:
    """The enrolled key a request came with: its name (a user's name is the owner of their jobs) and role."""

    name: str
    role: str


def may_send(role: str | None, sender: str) -> bool:
    """Whether a key of *role* (None: not enrolled) may send a message the protocol says *sender* sends."""
    if sender == CLIENT:
        return role in (ADMIN, USER)
    return role is not None and role == sender


# The admin CLI's command that sends a request, where it is not the request's own name.
_COMMANDS = {"image_missing": "image add", "image_put": "image add", "image_commit": "image add",
             "image_rm": "image rm", "user_add": "user add", "users": "user list", "user_rm": "user rm"}


def refusal(role: str | None, name: str | None, kind: str) -> str:
    """The one line a key that may not send *kind* is told: what it is, and who may."""
    if role == USER:
        command = _COMMANDS.get(kind, kind)
        return f"`coordinator {command}` is for the pool's admins; {name} is a user's key (ask an admin)"
    return f"{role or 'unenrolled'} keys may not send {kind}"


def may_manage(requester: Requester, owner: str) -> bool:
    """Whether *requester* may change (cancel, hold, release) a job submitted by *owner*: admins any job,
    users their own."""
    return requester.role == ADMIN or (requester.role == USER and requester.name == owner)


def not_yours(requester: Requester, job: int, owner: str, action: str) -> str:
    """Why *requester* may not *action* job *job*: one line saying whose it is and who may."""
    return (f"job {job} belongs to {owner or 'nobody known'}; {requester.name} may {action} only their own jobs "
            f"(an admin may {action} any)")


def check_user_name(name: str) -> str | None:
    """Why *name* cannot name a user, or None. A user's name is the owner shown on their jobs and the name of
    the client configuration handed to them, so it is short and safe in a file name and a shell."""
    if not 1 <= len(name) <= MAX_USER_NAME or not _USER_NAME.fullmatch(name):
        return (f"a user name is 1 to {MAX_USER_NAME} lower-case letters, digits, '.', '_' or '-', starting with a "
                f"letter (not {shell.command(name)})")
    return None
